"""Critical tokens of any model by branching (tether.eval.decisive): the swaps, the decisive
positions and the figures, checked on a tiny model with a checker whose decisive positions are
known, and the summary by hand."""

from dataclasses import dataclass

import pytest
import torch

from tether.eval.decisive import Branch, decisive_positions, decisive_table, summarise_decisive
from tether.generation.sampler import sample
from tether.models.loading import load_model_and_tokenizer
from tether.tasks.base import Task


@dataclass(frozen=True)
class Prompt:
    prompt: str
    target: str = ""


class FirstTwoChars(Task):
    """Correct iff the completion starts with the two characters given for its prompt: a swap at
    offset 0 or 1 changes them (one token per character), a later swap cannot."""

    def __init__(self, heads):
        self.heads = heads

    def pretrain_problem(self, rng):
        raise NotImplementedError

    def rl_problem(self, rng):
        raise NotImplementedError

    def is_correct(self, problem, completion):
        return completion[:2] == self.heads[problem.prompt]

    def max_new_tokens(self):
        return 6


def test_a_swap_decides_exactly_where_the_checker_looks(tiny_checkpoint):
    model, tok = load_model_and_tokenizer(str(tiny_checkpoint))
    problems = [Prompt(p) for p in ("12+3=", "7+45=", "99+1=")]
    greedy = sample(model, tok, [p.prompt for p in problems], max_new_tokens=6).texts
    assert all(len(t) >= 3 for t in greedy)  # long enough to have positions past the head
    heads = {p.prompt: t[:2] for p, t in zip(problems, greedy, strict=True)}
    heads["99+1="] = "no"  # this one is answered wrong: no branches from it
    task = FirstTwoChars(heads)
    correct, branches = decisive_positions(model, tok, task, problems, max_new_tokens=6)
    assert correct == [True, True, False]
    for i in (0, 1):
        rows = [b for b in branches if b.problem == i]
        ids = tok(greedy[i], add_special_tokens=False)["input_ids"]
        ends = len(ids) < 6  # an answer that ended on EOS has one more position
        assert [b.offset for b in rows] == list(range(len(ids) + ends))
        assert [b.wrong_after_swap for b in rows][:2] == [True, True]
        assert not any(b.wrong_after_swap for b in rows[2:])
        assert "".join(b.token for b in rows[: len(ids)]) == greedy[i]
        for b in rows:  # the swap is the model's first choice other than the greedy token
            assert b.alternative != b.token and 0.0 <= b.certainty["vocabulary"] <= 1.0
    b = next(b for b in branches if b.problem == 0 and b.offset == 1)
    with torch.no_grad():
        ids = tok(
            problems[0].prompt + greedy[0][:1], return_tensors="pt", add_special_tokens=False
        ).input_ids
        top2 = model(input_ids=ids).logits[0, -1].topk(2).indices.tolist()
    assert tok.decode([top2[1]]) == b.alternative  # greedy token first, the swap second


def test_the_summary_by_hand():
    def branch(problem, offset, c, wrong):
        return Branch(
            problem,
            offset,
            "7" if wrong else " ",
            "x",
            0.0,
            {"vocabulary": c, "typical": c / 2},
            wrong,
        )

    branches = [
        branch(0, 0, 0.5, True),
        branch(0, 1, 0.9, False),
        branch(0, 2, 1.0, False),
        branch(1, 0, 0.7, True),
        branch(1, 1, 0.8, True),
        branch(1, 2, 0.95, False),
        branch(1, 3, 0.99, False),
        branch(1, 4, 0.6, False),
    ]
    result = summarise_decisive([True, True, False, False], branches, exponent=2.0)
    assert result["greedy_accuracy"] == 0.5 and result["decisive"] == 3
    assert result["decisive_share"] == pytest.approx(3 / 8)
    f = result["forms"]["vocabulary"]
    # problem 0: 0.5 − 0.95 = −0.45; problem 1: 0.75 − 0.8467 = −0.0967; mean −0.27333
    assert f["delta_mean"] == pytest.approx((-0.45 + (0.75 - (0.95 + 0.99 + 0.6) / 3)) / 2)
    assert f["certainty_decisive"] == pytest.approx((0.5 + 0.7 + 0.8) / 3)
    assert f["weight_decisive"] == pytest.approx((0.25 + 0.49 + 0.64) / 3)
    assert result["forms"]["typical"]["certainty_decisive"] == pytest.approx(2 / 3 / 2)
    quartiles = result["quartiles"]
    assert sum(q["positions"] for q in quartiles) == 8
    # the lowest quartile (0.5, 0.6) has one decisive of two; the highest (0.99, 1.0) none
    assert quartiles[0]["wrong_after_swap"] == 0.5 and quartiles[-1]["wrong_after_swap"] == 0.0
    assert all(0.0 <= q["ci"][0] <= q["ci"][1] <= 1.0 for q in quartiles)
    assert result["decisive_by_kind"]["digit"] == {"decisive": 3, "positions": 3}
    table = decisive_table(result)
    assert "| vocabulary | 0.667 | 0.888 |" in table and "Greedy accuracy 50.0%" in table


def test_eval_certainty_on_a_chat_task(tiny_checkpoint):
    """tether eval --certainty on a task other than addition: the decisive-token figures for
    the problems asked (a random tiny model answers none right: no positions to branch)."""
    from tether.eval.checkpoint import evaluate_checkpoint

    result = evaluate_checkpoint(
        str(tiny_checkpoint), task="addition-chat", certainty=True, n=3, k=2, max_digits=2
    )
    assert result["task"] == "addition-chat" and result["decisive"]["n"] == 3
    assert result["decisive"]["greedy_accuracy"] == 0.0 and result["decisive"]["positions"] == 0
    assert "Greedy accuracy 0.0%" in decisive_table(result["decisive"])
