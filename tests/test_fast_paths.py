"""The faster paths of the RL and DPO steps equal the plain computations (values and
gradients), and the frozen reference is scored once per batch, without gradients."""

import pytest
import torch

from tether.config import load_recipe
from tether.engine.setup import build_policy
from tether.objectives import (
    entropy_from_log_softmax,
    exact_kl,
    exact_kl_from_log_softmax,
    log_softmax_and_token_logprobs,
    masked_mean,
    token_logprobs,
)
from tether.scoring import completion_window, grouped_completion_logits, left_to_right_padded
from tether.stages.base import make_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def completion_logits(
    model, input_ids, attention_mask, position_ids, prompt_len, temperature, hidden=False
):
    """The plain computation grouped_completion_logits must equal: one masked pass with
    explicit positions, the completion's window sliced out."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=hidden,
    )
    p, t = prompt_len, input_ids.shape[1] - prompt_len
    logits = out.logits[:, p - 1 : p + t - 1].float() / temperature
    if hidden:
        return logits, out.hidden_states[-1][:, p - 1 : p + t - 1]
    return logits


def _grads(value, params):
    return torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)


def _assert_close_all(got, expected, **tol):
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None or bool((g == 0).all())
        else:
            torch.testing.assert_close(g, e, **tol)


def test_one_log_softmax_gives_the_token_log_probs_entropy_and_exact_kl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.3).double()
    for temperature in (1.0, 0.7):
        log_p, logp = log_softmax_and_token_logprobs(logits, tokens, temperature)
        log_q = torch.log_softmax(ref / temperature, -1)
        fused = [
            logp,
            masked_mean(entropy_from_log_softmax(log_p), mask),
            exact_kl_from_log_softmax(log_p, log_q),
        ]
        plain = [
            token_logprobs(logits, tokens, temperature),
            masked_mean(  # H = −Σ_a π(a)·log π(a) from the softmax, not the log-softmax
                -(
                    torch.softmax(logits / temperature, -1)
                    * torch.log_softmax(logits / temperature, -1)
                ).sum(-1),
                mask,
            ),
            exact_kl(logits, ref, temperature),
        ]
        for f, p in zip(fused, plain, strict=True):
            torch.testing.assert_close(f, p)
            torch.testing.assert_close(_grads(f.sum(), [logits]), _grads(p.sum(), [logits]))


def test_entropy_from_log_softmax_is_zero_safe_at_minus_infinity():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]], requires_grad=True)
    log_p, _ = log_softmax_and_token_logprobs(logits, torch.tensor([0]))
    h = entropy_from_log_softmax(log_p)
    (grad,) = _grads(h.sum(), [logits])
    assert torch.isfinite(h).all() and torch.isfinite(grad).all()


def _sampler_rows():
    """Two prompts left-padded to 4 columns, completions right-padded to 5."""
    ids = torch.tensor(
        [[0, 0, 5, 6, 7, 8, 9, 0, 0], [3, 4, 5, 6, 10, 11, 12, 13, 14]], dtype=torch.long
    )
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, mask, 4


def test_sampler_rows_become_right_padded_and_the_window_finds_the_completion():
    ids, mask, prompt_len = _sampler_rows()
    packed, packed_mask, starts = left_to_right_padded(ids, mask, prompt_len)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0, 0], [3, 4, 5, 6, 10, 11, 12, 13, 14]]
    assert packed_mask.sum(1).tolist() == [5, 9] and starts.tolist() == [2, 4]
    # the positions that predict completion token j are starts - 1 + j
    window = completion_window(packed, starts, 5)
    assert window[0, :3].tolist() == [6, 7, 8] and window[1].tolist() == [6, 10, 11, 12, 13]


@pytest.mark.parametrize(
    ("hidden", "window"), [(False, True), (False, False), (True, True), (True, False)],
    ids=["window-head", "whole-head", "hidden-window-head", "hidden-whole-head"],
)  # fmt: skip
def test_grouped_completion_logits_equal_the_masked_pass(
    tiny_checkpoint, hidden, window, monkeypatch
):
    """Values and gradients of the masked pass, in length groups; with the LM head on the
    completion windows only (``logits_to_keep``) or on every position."""
    import tether.scoring

    monkeypatch.setattr(tether.scoring, "PASS_COST_POSITIONS", 1)  # a group per length
    calls = []
    real_window = tether.scoring.completion_window_logits
    monkeypatch.setattr(
        tether.scoring,
        "completion_window_logits",
        lambda *a, **k: calls.append(1) or real_window(*a, **k),
    )
    if not window:
        monkeypatch.setattr(tether.scoring, "keeps_logits", lambda model: False)
    model, _ = build_policy(load_recipe(None, [f"model.init={tiny_checkpoint}"]))
    g = torch.Generator().manual_seed(1)
    prompt_lens, completion_lens, P, T = [3, 7, 5, 7], [9, 2, 6, 9], 7, 9
    ids = torch.zeros(4, P + T, dtype=torch.long)
    mask = torch.zeros(4, P + T, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        ids[i, P - p : P + t] = torch.randint(3, 90, (p + t,), generator=g)
        mask[i, P - p : P + t] = 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    real = mask[:, P:].bool()
    params = list(model.parameters())

    def value(out):
        logits, h = out if hidden else (out, None)
        total = (token_logprobs(logits, ids[:, P:]) * real).sum()
        return total + (h.sum(-1) * real).sum() if hidden else total

    plain = completion_logits(model, ids, mask, position_ids, P, 0.8, hidden=hidden)
    grouped = grouped_completion_logits(model, ids, mask, P, 0.8, hidden=hidden)
    for a, b in zip(plain if hidden else [plain], grouped if hidden else [grouped], strict=True):
        torch.testing.assert_close(b[real], a[real].float(), atol=2e-5, rtol=1e-5)
    _assert_close_all(
        _grads(value(grouped), params), _grads(value(plain), params), atol=2e-5, rtol=1e-4
    )
    assert len(calls) == int(window)


def _model_and_tokens(checkpoint, seed, monkeypatch=None):
    """The tiny policy and a random-token maker; with ``monkeypatch``, a pass per length."""
    import tether.scoring

    if monkeypatch is not None:
        monkeypatch.setattr(tether.scoring, "PASS_COST_POSITIONS", 1)
    model, _ = build_policy(load_recipe(None, [f"model.init={checkpoint}"]))
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, 90, (n,), generator=g).tolist()

    return model, g, tokens


def _group_rows(prompts, completions):
    """Sampler rows: each prompt left-padded into the first P columns, its completion
    right-padded after them."""
    P, T = max(map(len, prompts)), max(map(len, completions))
    ids = torch.zeros(len(prompts), P + T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, P - len(p) : P + len(c)] = 1
    return ids, mask, P


@pytest.mark.parametrize("groups", ["one-pass", "a-pass-per-length"])
@pytest.mark.parametrize("hidden", [False, True], ids=["logits", "hidden"])
def test_a_groups_shared_prompt_runs_once_and_each_row_scores_as_alone(
    tiny_checkpoint, groups, hidden, monkeypatch
):
    """Rows with the same prompt (a GRPO group) packed into one row: the group's first row,
    then each other row after the prefix it shares with it, under a 4D mask. Logits and
    hidden states at every completion position, and their gradients, equal the rows run as
    they are (the unpacked path, itself checked against the masked pass above) and each row
    alone. Groups, interleaved: prompt A with a completion, one that shares its first two
    tokens, an identical one and an empty one; prompt B with two that share their first
    token; prompt C alone."""
    import tether.scoring

    per_length = monkeypatch if groups == "a-pass-per-length" else None
    model, g, tokens = _model_and_tokens(tiny_checkpoint, 5, per_length)
    A, B, C = tokens(5), tokens(3), tokens(4)
    a1, b1 = tokens(4), tokens(6)
    a2 = a1[:2] + [(a1[2] + 1) % 90 + 3] + tokens(2)
    rows = [
        (A, a1),
        (B, b1),
        (A, a2),
        (C, tokens(3)),
        (A, list(a1)),
        (B, [b1[0], *tokens(1)]),
        (A, []),
    ]
    ids, mask, P = _group_rows(*zip(*rows, strict=True))
    passes = []
    embed = model.get_input_embeddings()
    embed.register_forward_hook(lambda m, args, out: passes.append(tuple(args[0].shape)))
    packed = grouped_completion_logits(model, ids, mask, P, 0.8, hidden=hidden)
    ran = list(passes)
    passes.clear()
    monkeypatch.setattr(tether.scoring, "takes_4d_masks", lambda model: False)
    plain = grouped_completion_logits(model, ids, mask, P, 0.8, hidden=hidden)
    # packed rows: A 9 + 3 (a2 after the 7 tokens it shares) + 0 + 0, B 9 + 1 (the second
    # row shares the first one's first completion token), C 7: 3 rows of 27 positions, not 7
    # of 54
    if groups == "one-pass":
        assert ran == [(3, 12)]
    else:
        assert sorted(ran) == [(1, 7), (1, 10), (1, 12)]
    real = mask[:, P:].bool()
    real[6, 0] = True  # the empty completion's window: the logits after its prompt
    got = packed if hidden else (packed,)
    expected = plain if hidden else (plain,)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a[real], b[real], atol=2e-5, rtol=1e-5)
    # each row alone, unpadded
    for i, (prompt, completion) in enumerate(rows):
        row = torch.tensor([prompt + completion])
        logits = model(input_ids=row).logits[0, len(prompt) - 1 :].float() / 0.8
        n = max(len(completion), 1)
        torch.testing.assert_close(got[0][i, :n], logits[:n], atol=2e-5, rtol=1e-5)
    params = list(model.parameters())
    weights = [torch.randn(v.shape, generator=g) * real[..., None] for v in got]

    def value(out):
        return sum((v.float() * w).sum() for v, w in zip(out, weights, strict=True))

    _assert_close_all(_grads(value(got), params), _grads(value(expected), params), atol=2e-5,
                      rtol=1e-4)  # fmt: skip


def test_groups_pack_only_where_it_pays(tiny_checkpoint):
    """Distinct prompts, and a group whose completions are long beside its prompt (a packed
    row of 3 + 3 × 20 = 63 positions against three rows of 23: 3,969 > 1,587), run as they
    are."""
    from tether.scoring import left_to_right_padded, packed_completion_window_logits

    model, _, tokens = _model_and_tokens(tiny_checkpoint, 6)
    prompt = tokens(3)
    for rows in (
        [(tokens(3), tokens(4)) for _ in range(3)],
        [(prompt, tokens(20)) for _ in range(3)],
    ):
        ids, mask, P = _group_rows(*zip(*rows, strict=True))
        right, right_mask, starts = left_to_right_padded(ids, mask, P)
        length = ids.shape[1] - P
        assert packed_completion_window_logits(model, right, right_mask, starts, length) is None


def test_the_lm_head_runs_on_the_completion_windows_only(tiny_checkpoint, monkeypatch):
    """With ``logits_to_keep`` the head sees the positions from the group's earliest window on:
    rows whose prompts are 3 and 7 of 7 columns long and completions 9 long keep 10 of 12 and
    10 of 16 positions, not all of them."""
    import tether.scoring

    monkeypatch.setattr(tether.scoring, "PASS_COST_POSITIONS", 1)  # a group per length
    model, _ = build_policy(load_recipe(None, [f"model.init={tiny_checkpoint}"]))
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    P, T = 7, 9
    ids = torch.full((2, P + T), 5, dtype=torch.long)
    mask = torch.ones(2, P + T, dtype=torch.long)
    mask[0, : P - 3] = 0
    grouped_completion_logits(model, ids, mask, P, 1.0)
    assert sorted(seen) == [10, 10]


@pytest.mark.parametrize("window", [True, False], ids=["window-head", "whole-head"])
def test_loss_token_logprobs_equal_the_shifted_log_probs_at_the_loss_positions(
    tiny_checkpoint, window, monkeypatch
):
    """MLE's and DPO's log-probs: at every loss position the values and gradients of one
    masked pass's shifted log-probs; the LM head runs from each length group's earliest loss
    position on (two rows of 12 with loss from columns 4 and 6: 9 positions, not 12)."""
    import tether.scoring
    from tether.objectives import shifted_token_logprobs
    from tether.scoring import loss_token_logprobs

    monkeypatch.setattr(tether.scoring, "PASS_COST_POSITIONS", 1)  # a group per length
    if not window:
        monkeypatch.setattr(tether.scoring, "keeps_logits", lambda model: False)
    model, _ = build_policy(load_recipe(None, [f"model.init={tiny_checkpoint}"]))
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    g = torch.Generator().manual_seed(2)
    lengths, starts, L = [12, 9, 12, 7], [4, 3, 6, 5], 12  # right-padded rows, loss from start
    ids = torch.zeros(4, L, dtype=torch.long)
    mask = torch.zeros(4, L, dtype=torch.long)
    loss_mask = torch.zeros(4, L, dtype=torch.long)
    for i, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        ids[i, :n] = torch.randint(3, 90, (n,), generator=g)
        mask[i, :n] = 1
        loss_mask[i, s:n] = 1
    params = list(model.parameters())
    plain = shifted_token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
    seen.clear()
    got = loss_token_logprobs(model, ids, mask, loss_mask)
    real = loss_mask.bool()
    assert got.shape == (4, L)
    torch.testing.assert_close(got[real], plain[real], atol=2e-5, rtol=1e-5)
    assert bool((got[~mask.bool()] == 0).all())  # padding stays 0
    if window:  # groups: rows 0 and 2 (length 12, loss from 4 and 6), row 1 (9), row 3 (7)
        assert sorted(seen) == sorted([12 - 3, 9 - 2, 7 - 4])
    else:
        assert sorted(seen) == sorted([12, 9, 7])
    _assert_close_all(
        _grads((got * real).sum(), params),
        _grads((plain * real).sum(), params),
        atol=2e-5,
        rtol=1e-4,
    )


def _pair_rows(chosen, rejected, starts):
    """Right-padded pair rows (chosen rows, then rejected rows) with loss from ``starts``."""
    rows = chosen + rejected
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, starts + starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        loss_mask[i, start : len(row)] = 1
    return ids, mask, loss_mask


@pytest.mark.parametrize("groups", ["one-group", "a-group-per-length"])
def test_pair_log_probs_run_the_shared_prefix_once_and_equal_each_row_scored_alone(
    tiny_checkpoint, groups, monkeypatch
):
    """Each pair packed into one row (the chosen row, then the rejected row after their shared
    prefix, at its own positions, under a 4D mask): at every loss position the values and
    gradients of each row scored alone. Pairs: a long shared prefix, rows that part at their
    first token, a rejected row that is the chosen row cut short, identical rows, a chosen
    row that is a prefix of the rejected one."""
    from tether.objectives import shifted_token_logprobs
    from tether.scoring import pair_token_logprobs, shared_prefix_lengths

    per_length = monkeypatch if groups == "a-group-per-length" else None
    model, _, tokens = _model_and_tokens(tiny_checkpoint, 3, per_length)
    a, b, c = tokens(12), tokens(3), tokens(7)
    d, e = tokens(6), tokens(5)
    chosen = [a, b, c, d, e]
    rejected = [a[:8] + tokens(5), [(b[0] + 1) % 90 + 3, *tokens(2)], c[:5], d, e + tokens(3)]
    ids, mask, loss_mask = _pair_rows(chosen, rejected, [4, 1, 2, 2, 3])
    assert shared_prefix_lengths(ids, mask, 5).tolist() == [8, 0, 5, 6, 5]
    seen, passes = [], []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    embed = model.get_input_embeddings()
    embed.register_forward_hook(lambda m, args, out: passes.append(tuple(args[0].shape)))
    got = pair_token_logprobs(model, ids, mask, loss_mask)
    head = [tuple(s[:2]) for s in seen]  # [rows, positions] of each LM head call
    ran = list(passes)
    alone = torch.zeros(ids.shape)
    for i, n in enumerate(mask.sum(dim=1).tolist()):  # each row alone, unpadded
        row = ids[i : i + 1, :n]
        alone[i, :n] = shifted_token_logprobs(model(input_ids=row).logits, row)[0]
    real = loss_mask.bool()
    torch.testing.assert_close(got[real], alone[real], atol=2e-5, rtol=1e-5)
    assert bool((got[~mask.bool()] == 0).all())
    # the shared prefixes ran once: 5 packed rows of 12+5, 3+3, 7+0, 6+0, 5+3 tokens (44, not
    # the pairs' 68), the head from each group's earliest loss position on
    if groups == "one-group":
        assert ran == [(5, 17)] and head == [(5, 17)]  # from column 0 (loss from column 1)
    else:  # groups where a cut saves more than a position: 17, then 8 + 7, then 6 + 6
        assert sorted(ran) == [(1, 17), (2, 6), (2, 8)]
    params = list(model.parameters())
    _assert_close_all(
        _grads((got * real).sum(), params),
        _grads((alone * real).sum(), params),
        atol=2e-5,
        rtol=1e-4,
    )


def test_pairs_that_share_little_are_scored_unpacked(tiny_checkpoint):
    """Packing pays when the packed rows' attention squares add up to no more than the rows'
    own: 10 + 10 tokens sharing 4 pack into 16 (256 ≤ 200? no: unpacked), sharing 7 into 13
    (169 ≤ 200: packed); rows over PACKED_ROW_MAX never pack."""
    from tether.scoring import loss_token_logprobs, packing_pays, pair_token_logprobs

    ten = torch.tensor([10, 10])
    assert not packing_pays(ten, torch.tensor([16]))
    assert packing_pays(ten, torch.tensor([13]))
    assert packing_pays(ten, torch.tensor([14]))  # 196 ≤ 200
    assert not packing_pays(torch.tensor([1000, 1000]), torch.tensor([1025]))
    assert not packing_pays(torch.tensor([82] * 8), torch.tensor([250]))  # 62,500 > 53,792
    assert packing_pays(torch.tensor([82] * 8), torch.tensor([231]))  # 53,361
    model, _ = build_policy(load_recipe(None, [f"model.init={tiny_checkpoint}"]))
    g = torch.Generator().manual_seed(4)
    chosen = [torch.randint(3, 90, (10,), generator=g).tolist() for _ in range(3)]
    rejected = [row[:4] + [(row[4] + 1) % 90 + 3] + row[5:] for row in chosen]
    ids, mask, loss_mask = _pair_rows(chosen, rejected, [2, 2, 2])
    passes = []
    embed = model.get_input_embeddings()
    embed.register_forward_hook(lambda m, args, out: passes.append(tuple(args[0].shape)))
    got = pair_token_logprobs(model, ids, mask, loss_mask)
    assert passes == [(6, 10)]  # the six rows as they are
    torch.testing.assert_close(got, loss_token_logprobs(model, ids, mask, loss_mask))


def test_pairs_are_packed_only_under_attention_that_takes_a_custom_mask(tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    from tether.models.lora import LoraReference
    from tether.scoring import takes_4d_masks

    model, _ = build_policy(load_recipe(None, [f"model.init={tiny_checkpoint}"]))
    assert model.config._attn_implementation == "sdpa" and takes_4d_masks(model)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert takes_4d_masks(LoraReference(lora))
    model.config._attn_implementation = "flash_attention_2"  # padding masks only
    assert not takes_4d_masks(lora)


def test_keeps_logits_looks_through_the_wrappers(tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    from tether.scoring import keeps_logits

    model, _ = build_policy(load_recipe(None, [f"model.init={tiny_checkpoint}"]))
    assert keeps_logits(model)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert keeps_logits(lora)
    assert keeps_logits(torch.compile(lora))
    from tether.models.lora import LoraReference

    assert keeps_logits(LoraReference(lora))
    assert not keeps_logits(torch.nn.Linear(2, 2))


def _reference_passes(overrides):
    """Reference passes while drawing one batch, and while taking every update on it (the PPO
    epochs), each noted True where gradients (or inference mode) were on; and the batch."""
    recipe = load_recipe(None, overrides)
    model, tokenizer = build_policy(recipe)
    stage = make_stage(recipe, tokenizer, model, torch.device("cpu"))
    calls = []
    stage.reference.register_forward_hook(
        lambda *_: calls.append(torch.is_grad_enabled() or torch.is_inference_mode_enabled())
    )
    batch = stage.next_batch()
    drawing = list(calls)
    for _ in range(stage.epochs_per_batch):
        stage.loss(model, batch)[0].backward()
    return drawing, calls[len(drawing) :], batch


def test_ppo_scores_the_reference_once_per_rollout_without_gradients(tiny_checkpoint):
    ppo = ["train.stage=rl", "rl.algorithm=ppo", "rl.ppo_epochs=3", "rl.prompts_per_step=4"]
    drawing, updating, rollout = _reference_passes(
        ["task.name=first-digit", f"model.init={tiny_checkpoint}", *ppo, "rl.kl_estimator=exact"]
    )
    # scored when the rollout is drawn (a pass per length group), under no_grad; never again
    assert drawing and not any(drawing) and updating == []
    assert not rollout.ref_logp.requires_grad and not rollout.ref_log_softmax.requires_grad


def test_dpo_scores_the_reference_once_per_batch_without_gradients(tiny_checkpoint):
    pairs = ["task.name=multistep-prefs", "task.max_digits=1", "train.batch_size=4"]
    drawing, updating, _ = _reference_passes(
        [*pairs, f"model.init={tiny_checkpoint}", "train.stage=dpo"]
    )
    assert drawing and not any(drawing) and updating == []


@pytest.mark.slow  # compiling takes about half a minute on two CPU cores
def test_train_compile_gives_the_eager_loss_and_gradients(tiny_checkpoint):
    from tether.engine.setup import compile_models

    recipe = load_recipe(
        None,
        [
            "task.name=multistep-prefs",
            "task.max_digits=1",
            f"model.init={tiny_checkpoint}",
            "train.stage=dpo",
            "train.batch_size=4",
        ],
    )
    model, tokenizer = build_policy(recipe)
    stage = make_stage(recipe, tokenizer, model, torch.device("cpu"))
    batch = stage.next_batch()
    params = list(model.parameters())
    eager_loss, _ = stage.loss(model, batch)
    eager_grads = _grads(eager_loss, params)
    compile_models(model, stage)
    loss, _ = stage.loss(model, stage.next_batch())  # compiles, reference included
    loss, _ = stage.loss(model, batch)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # no retain: compiled backward
    _assert_close_all(grads, eager_grads, atol=1e-5, rtol=1e-4)
    assert type(model).__name__ == "LlamaForCausalLM"  # compiled in place: still the HF model


def test_entropy_and_exact_kl_metrics_equal_the_differentiable_ones():
    """The one-pass metrics give entropy_from_log_softmax's and exact_kl_from_log_softmax's
    values, with tokens of probability 0 (−inf) on either side, and carry no gradient."""
    from tether.objectives import entropy_and_exact_kl

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 50, generator=g, requires_grad=True)
    ref = torch.randn(4, 6, 50, generator=g)
    cut = torch.zeros(50)
    cut[40:] = float("-inf")  # π(a) = 0 for the last ten tokens
    for bias in (torch.zeros(50), cut):
        log_p = torch.log_softmax(logits + bias, -1)
        log_q = torch.log_softmax(ref + bias.flip(0).clamp_min(-1e3), -1)
        entropy, kl = entropy_and_exact_kl(log_p, log_q)
        assert not entropy.requires_grad and not kl.requires_grad
        torch.testing.assert_close(entropy, entropy_from_log_softmax(log_p).detach())
        torch.testing.assert_close(kl, exact_kl_from_log_softmax(log_p, log_q).detach())
        assert torch.isfinite(entropy).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_pass_a_finite_difference_check_chunk_by_chunk(
    temperature, monkeypatch
):
    """log π(a|s) by chunks of positions with its own backward g·(onehot − softmax)/T: the
    values of token_logprobs, and gradients that pass gradcheck, over several chunks."""
    import tether.objectives.common as common
    from tether.objectives import chunked_token_logprobs

    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 40)  # 3 positions of 11 a chunk
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 4), generator=g)
    got = chunked_token_logprobs(logits, tokens, temperature)
    torch.testing.assert_close(got, token_logprobs(logits, tokens, temperature))
    assert torch.autograd.gradcheck(
        lambda x: chunked_token_logprobs(x, tokens, temperature), (logits,)
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_chunked_entropy_is_h_of_the_softmax_with_its_gradient(temperature, monkeypatch):
    """H(π) per position from the same chunks: entropy_from_log_softmax's value, −inf logits
    (π = 0) included, and a gradient (alone and with log π's) that passes gradcheck."""
    import tether.objectives.common as common
    from tether.objectives import chunked_token_logprobs_and_entropy

    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 40)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 8, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cut = torch.zeros(11, dtype=torch.float64)
    cut[8:] = float("-inf")
    logp, h = chunked_token_logprobs_and_entropy(logits + cut, tokens, temperature)
    log_p = torch.log_softmax((logits + cut) / temperature, -1)
    torch.testing.assert_close(h, entropy_from_log_softmax(log_p))
    torch.testing.assert_close(logp, token_logprobs(logits + cut, tokens, temperature))
    (grad,) = torch.autograd.grad((h * weights).sum(), logits)
    (plain,) = torch.autograd.grad((entropy_from_log_softmax(log_p) * weights).sum(), logits)
    torch.testing.assert_close(grad, plain)
    assert torch.autograd.gradcheck(
        lambda x: chunked_token_logprobs_and_entropy(x, tokens, temperature), (logits,)
    )


def test_chunked_token_logprobs_hand_bf16_logits_a_bf16_gradient():
    """bf16 logits: fp32 log-probs equal to the plain path's (the upcast is exact), and the
    gradient comes back in bf16, the fp32 gradient rounded once."""
    from tether.objectives import chunked_token_logprobs

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, 300, generator=g).bfloat16().requires_grad_()
    tokens = torch.randint(0, 300, (5, 7), generator=g)
    weights = torch.randn(5, 7, generator=g)
    got = chunked_token_logprobs(logits, tokens, 0.9)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, token_logprobs(logits, tokens, 0.9))
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    (plain,) = torch.autograd.grad((token_logprobs(logits, tokens, 0.9) * weights).sum(), logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), plain.float(), atol=0, rtol=0)


def test_chunked_metrics_equal_the_one_pass_metrics(monkeypatch):
    import tether.objectives.common as common
    from tether.objectives import chunked_entropy_and_exact_kl, entropy_and_exact_kl

    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 100)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 50, generator=g).bfloat16()
    log_q = torch.log_softmax(torch.randn(4, 6, 50, generator=g), -1)
    for t in (1.0, 0.8):
        got = chunked_entropy_and_exact_kl(logits, log_q, t)
        want = entropy_and_exact_kl(torch.log_softmax(logits.float() / t, -1), log_q)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("algorithm", "entropy_coef"), [("grpo", 0.0), ("rloo", 0.0), ("ppo", 0.0), ("grpo", 0.05)]
)
def test_the_rl_loss_by_chunks_equals_the_full_log_softmax(
    algorithm, entropy_coef, tiny_checkpoint
):
    """Without the exact KL the stage scores only the sampled tokens (and H for an entropy
    bonus), by chunks (stage.chunked): the loss, its gradient and every logged figure are
    those of the full log-softmax path."""
    recipe = load_recipe(
        None,
        [
            f"model.init={tiny_checkpoint}",
            "train.stage=rl",
            f"rl.algorithm={algorithm}",
            "rl.group_size=2",
            "rl.prompts_per_step=3",
            "rl.max_new_tokens=4",
            "rl.kl_estimator=k3",
            "rl.kl_coef=0.2",
            f"rl.entropy_coef={entropy_coef}",
        ],
    )
    torch.manual_seed(0)
    model, tokenizer = build_policy(recipe)
    stage = make_stage(recipe, tokenizer, model, torch.device("cpu"))
    with torch.no_grad():  # off the reference: a KL and its gradient that are not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert stage.chunked
    rollout = stage.next_batch()
    params = [p for p in [*model.parameters(), *stage.parameters()] if p.requires_grad]
    results = []
    for chunked in (True, False):
        stage.chunked = chunked
        loss, stats = stage.loss(model, rollout)
        results.append((loss, stats, torch.autograd.grad(loss, params)))
    (loss_c, stats_c, grads_c), (loss_f, stats_f, grads_f) = results
    torch.testing.assert_close(loss_c, loss_f)
    assert stats_c.keys() == stats_f.keys()
    for key in stats_c:
        assert stats_c[key] == pytest.approx(stats_f[key], rel=1e-5, abs=1e-6), key
    _assert_close_all(grads_c, grads_f, atol=1e-6, rtol=1e-4)
