"""``tether eval``: a model's figures on its task (:func:`tether.eval.checkpoint.evaluate_checkpoint`),
as tables or one JSON document."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tether.cli.common import (
    MAX_SEED,
    ChatTemplateOption,
    SystemPromptOption,
    echo_json,
    friendly_errors,
    parse_digits,
    parse_temperatures,
    prompt_format_option,
)
from tether.eval.addition import accuracy_table, certainty_table
from tether.eval.checkpoint import evaluate_checkpoint
from tether.eval.decisive import decisive_table
from tether.eval.imitation import seeds_table
from tether.tasks.enumerable import EnumerableTask

app = typer.Typer(add_completion=False)


# the options, each with its help
Checkpoint = Annotated[
    str,
    typer.Argument(
        help="shipped or installed model name (tether models), checkpoint, run directory or "
        "Hugging Face folder"
    ),
]
TaskName = Annotated[
    str | None,
    typer.Option(help="addition, multistep... (default: the task the checkpoint was trained on)"),
]
Digits = Annotated[str, typer.Option(help="digit lengths, N or LO-HI")]
Problems = Annotated[int, typer.Option(min=1, help="problems per length and kind")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 = greedy; > 0 = sampled Pass@1")]
Certainty = Annotated[
    bool,
    typer.Option(
        help="also the critical-token certainty analysis: Table 1 (addition); on other tasks the "
        "decisive positions of the greedy answers (a swap to the second choice makes them wrong)"
    ),
]
MaxDigits = Annotated[
    int | None,
    typer.Option(
        help="N of the model (addition); task.max_digits of another task (default: from the checkpoint)"
    ),
]
Seed = Annotated[
    int, typer.Option(min=0, max=MAX_SEED, help="seed of the problems and of sampling")
]
BatchSize = Annotated[int, typer.Option(min=1)]
Temperatures = Annotated[
    str | None, typer.Option(help="diversity sweep: comma-separated temperatures, e.g. 0.5,1")
]
SamplesPerPrompt = Annotated[
    int, typer.Option(min=2, help="samples per prompt for the sweep/rewards")
]
Rewards = Annotated[
    bool, typer.Option(help="IQLearn reward extraction: returns vs task score (Spearman)")
]
Exact = Annotated[
    bool,
    typer.Option(
        help="enumerable task: exact KL to the target p* ∝ π_ref·exp(r/β), entropy, reward"
    ),
]
Reference = Annotated[
    str | None, typer.Option(help="--exact: π_ref (default: the checkpoint's init)")
]
Beta = Annotated[
    float | None, typer.Option(help="--exact: β of the target (default: the dpg.beta used)")
]
Data = Annotated[
    str | None,
    typer.Option(help="the task's JSON Lines file (jsonl, prefs-jsonl; default: the checkpoint's)"),
]
Json = Annotated[bool, typer.Option("--json", help="print one JSON document")]


@app.command("eval")
@friendly_errors
def eval_(
    checkpoint: Checkpoint,
    task: TaskName = None,
    digits: Digits = "1-5",
    n: Problems = 1000,
    temperature: Temperature = 0.0,
    certainty: Certainty = False,
    max_digits: MaxDigits = None,
    seed: Seed = 0,
    batch_size: BatchSize = 256,
    temperatures: Temperatures = None,
    k: SamplesPerPrompt = 4,
    rewards: Rewards = False,
    exact: Exact = False,
    reference: Reference = None,
    beta: Beta = None,
    data: Data = None,
    chat_template: ChatTemplateOption = None,
    system_prompt: SystemPromptOption = None,
    json_: Json = False,
) -> None:
    """Accuracy per digit length (addition) or accuracy and score (other tasks), with 95%
    intervals; optionally a diversity sweep over temperatures and the extracted rewards.
    With --exact (enumerable task): every response enumerated, exact figures against the
    target p* ∝ π_ref·exp(r/β) for the policy, the reference and the target itself."""
    result = evaluate_checkpoint(
        checkpoint,
        task=task,
        digits=parse_digits(digits),
        n=n,
        temperature=temperature,
        certainty=certainty,
        max_digits=max_digits,
        seed=seed,
        batch_size=batch_size,
        temperatures=parse_temperatures(temperatures) if temperatures else None,
        k=k,
        rewards=rewards,
        exact=exact,
        reference=reference,
        beta=beta,
        progress=not json_,
        prompt_format=prompt_format_option(checkpoint, chat_template, system_prompt),
        data=data,
    )
    if json_:
        echo_json(result)
    elif "figures" in result:
        print_exact(result)
    elif "sweep" in result:
        print_sampled(result)
    else:
        print_addition(result, n, temperature)


def print_addition(result: dict[str, Any], n: int, temperature: float) -> None:
    """Accuracy per digit length and kind (and the certainty table)."""
    mode = "greedy" if temperature == 0 else f"sampled Pass@1, T={temperature}"
    typer.echo(f"{result['checkpoint']} on addition ({mode}, n={n} per cell)\n")
    typer.echo(accuracy_table(result["accuracy"]))
    if "certainty" in result:
        typer.echo("\n" + certainty_table(result["certainty"]))


def print_sampled(result: dict[str, Any]) -> None:
    """The sweep's table (and the implicit reward's correlation and examples)."""
    typer.echo(
        f"{result['checkpoint']} on {result['task']} ({result['n']} prompts x "
        f"{result['k']} samples)\n"
    )
    typer.echo(seeds_table({"model": [result["sweep"]]}))
    if "rewards" in result:
        r = result["rewards"]
        typer.echo(
            f"\nextracted reward vs task score: Spearman rho = {r['spearman_rho']:.3f} "
            f"(p = {r['p_value']:.2g}, n = {r['n']}); within prompts {r['spearman_rho_within']:.3f}"
        )
        for ex in result["reward_examples"]:
            typer.echo(f"\n{ex['prompt']}\n  {ex['tokens']}")
    if "decisive" in result:
        typer.echo(
            "\ncritical tokens: greedy answers, each position swapped for the second choice\n"
        )
        typer.echo(decisive_table(result["decisive"]))


EXACT_ROWS = (
    ("kl_target_policy", "KL(p*‖π)"),
    ("kl_policy_target", "KL(π‖p*)"),
    ("kl_policy_ref", "KL(π‖π_ref)"),
    ("tv", "TV(π, p*)"),
    ("js", "JS(π, p*)"),
    ("entropy", "entropy H(π)"),
    ("reward", "E_π[r]"),
    ("accuracy", "π(r = 1)"),
    ("objective", "J = E[r] − β·KL(π‖π_ref)"),
    ("rejection_acceptance", "accepted, sampling p*"),
)


def print_exact(result: dict[str, Any]) -> None:
    """The exact figures of the policy, the reference and the target, and the policy's most
    probable responses."""
    task = EnumerableTask(result["task"]["max_digits"])
    moments, beta, figures = result["moments"], result["beta"], result["figures"]
    if moments:
        form = "π_ref·exp(λ·φ) with means " + ", ".join(f"{k} = {v:g}" for k, v in moments.items())
    elif beta is not None:
        form = f"π_ref·exp(r/β), β = {beta:g}"
    else:
        form = "π_ref·[correct]"
    typer.echo(
        f"{result['checkpoint']} on enumerable: all {result['responses']} responses to "
        f"{task.prompt!r} (0-{task.max_digits} digits from {task.vocabulary} then EOS, or "
        f"{task.max_len} cut at the limit)\n"
        f"reference: {result['reference']}\ntarget: p* ∝ {form}, log Z = {result['log_z']:.4f}\n"
    )
    typer.echo(f"{'π =':<26}{'policy':>10}{'reference':>11}{'target':>10}")
    for key, label in EXACT_ROWS:
        if key not in figures["target"]:
            continue
        cells = "".join(
            f"{figures[name].get(key, float('inf')):>{w}.4f}"
            for name, w in (("policy", 10), ("reference", 11), ("target", 10))
        )
        typer.echo(f"{label:<26}{cells}")
    typer.echo(
        f"\nmost probable under the policy:\n{'response':<12}{'π':>8}{'p*':>8}{'π_ref':>8}{'r':>6}"
    )
    for row in result["top_responses"]:
        typer.echo(
            f"{row['response']:<12}{row['policy']:>8.4f}{row['target']:>8.4f}"
            f"{row['reference']:>8.4f}{row['reward']:>6.2f}"
        )
