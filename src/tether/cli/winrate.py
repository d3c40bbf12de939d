"""``tether winrate``: InfAlign's inference-time win rate of a saved policy against its
reference (:func:`tether.eval.checkpoint.checkpoint_winrate`), as a table or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from tether.cli.common import (
    MAX_SEED,
    ChatTemplateOption,
    SystemPromptOption,
    UsageError,
    check_out,
    echo_json,
    friendly_errors,
    parse_ns,
    prompt_format_option,
)
from tether.eval.checkpoint import checkpoint_winrate
from tether.eval.winrate import WinRateReport

app = typer.Typer(add_completion=False)

# the options, each with its help
Policy = Annotated[
    str,
    typer.Argument(
        help="the policy: shipped or installed model name, checkpoint, run directory or "
        "Hugging Face folder"
    ),
]
Reference = Annotated[
    str | None,
    typer.Option(help="π_ref (default: the model the policy was trained from, its init)"),
]
Ns = Annotated[str, typer.Option("--n", help="comma-separated N of best/worst-of-N decoding")]
Mode = Annotated[str, typer.Option(help="best (best-of-N) or worst (worst-of-N)")]
Prompts = Annotated[int, typer.Option(min=2, help="prompts drawn from the task")]
Samples = Annotated[int, typer.Option(min=1, help="samples per prompt and model (M)")]
Temperature = Annotated[float, typer.Option(help="sampling temperature, > 0")]
Seed = Annotated[int, typer.Option(min=0, max=MAX_SEED)]
Reward = Annotated[
    str | None,
    typer.Option(
        "--reward", help="checker, graded, python or model (default: the policy's reward section)"
    ),
]
RewardFunction = Annotated[
    str | None, typer.Option(help="python reward: 'package.module:name' or 'file.py:name'")
]
RewardModel = Annotated[
    str | None, typer.Option(help="model reward: a reward-model checkpoint or run directory")
]
TaskName = Annotated[
    str | None, typer.Option(help="the task (default: the one the policy was trained on)")
]
MaxDigits = Annotated[int | None, typer.Option(min=1, max=18, help="the task's max_digits")]
Data = Annotated[
    str | None, typer.Option(help="the task's JSON Lines file (default: the policy's)")
]
MaxNewTokens = Annotated[int | None, typer.Option(min=1, help="default: the task's budget")]
BatchSize = Annotated[int, typer.Option(min=1, help="rows sampled at once")]
Json = Annotated[bool, typer.Option("--json", help="print the report as JSON")]
Plot = Annotated[Path | None, typer.Option(help="write a PNG of win rate against N")]
Threads = Annotated[int | None, typer.Option(min=1, help="torch CPU threads")]


@app.command()
@friendly_errors
def winrate(
    policy: Policy,
    reference: Reference = None,
    ns: Ns = "1,2,4,8,16",
    mode: Mode = "best",
    prompts: Prompts = 64,
    samples: Samples = 32,
    temperature: Temperature = 1.0,
    seed: Seed = 0,
    reward: Reward = None,
    reward_function: RewardFunction = None,
    reward_model: RewardModel = None,
    task: TaskName = None,
    max_digits: MaxDigits = None,
    data: Data = None,
    max_new_tokens: MaxNewTokens = None,
    batch_size: BatchSize = 64,
    json_: Json = False,
    plot: Plot = None,
    threads: Threads = None,
    chat_template: ChatTemplateOption = None,
    system_prompt: SystemPromptOption = None,
) -> None:
    """InfAlign's inference-time win rate: the policy's best-of-N (or worst-of-N) against the
    reference decoded the same way, judged by the reward, for each N; with KL(policy||reference)."""
    n_values = parse_ns(ns)
    if mode not in ("best", "worst"):
        raise UsageError(f"--mode {mode!r}: choose best or worst")
    if not temperature > 0:
        raise UsageError(f"--temperature {temperature}: must be > 0 (best-of-N needs samples)")
    if plot is not None:
        check_out("--plot", plot, file=True)
    if threads:
        torch.set_num_threads(threads)
    report = checkpoint_winrate(
        policy,
        reference=reference,
        ns=n_values,
        mode="best" if mode == "best" else "worst",
        prompts=prompts,
        samples=samples,
        temperature=temperature,
        seed=seed,
        reward=reward,
        reward_function=reward_function,
        reward_model=reward_model,
        task=task,
        max_digits=max_digits,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=not json_,
        plot=plot,
        prompt_format=prompt_format_option(policy, chat_template, system_prompt),
        data=data,
    )
    echo_json(report.to_dict()) if json_ else print_winrate(report)


def print_winrate(report: WinRateReport) -> None:
    """The settings, a table of the win rate per N, and the KL, rewards and accuracies."""
    r, info = report, report.info
    console = Console(highlight=False)
    console.print(
        f"policy {info['policy']}\nreference {info['reference']}\n"
        f"task {info['task']['name']}, reward {info['reward']['kind']}, T={r.temperature:g}, "
        f"{r.prompts} prompts x {r.samples} samples per model",
        soft_wrap=True,
    )
    table = Table(title=f"win rate, {r.mode}-of-N vs {r.mode}-of-N")
    table.add_column("N", justify="right")
    table.add_column("from CDFs ± se", justify="right")
    table.add_column("Monte Carlo ± se", justify="right")
    table.add_column("games", justify="right")
    for p in r.points:
        mc = "-" if p.mc is None else f"{p.mc.rate:.3f} ± {p.mc.stderr:.3f}"
        games = "-" if p.mc is None else str(p.mc.games)
        table.add_row(str(p.n), f"{p.cdf.mean:.3f} ± {p.cdf.stderr:.3f}", mc, games)
    console.print(table)
    console.print(
        f"KL(policy || reference) at T={r.temperature:g}: {r.kl.mean:.4g} ± {r.kl.stderr:.2g} "
        "nats per sequence (k1 estimate)\n"
        f"standard win rate (N = 1): {r.standard.mean:.3f} ± {r.standard.stderr:.3f}\n"
        f"mean reward: policy {r.reward_policy.mean:.4g} ± {r.reward_policy.stderr:.2g}, "
        f"reference {r.reward_reference.mean:.4g} ± {r.reward_reference.stderr:.2g}\n"
        f"accuracy: policy {r.accuracy_policy.mean:.1%} ± {r.accuracy_policy.stderr:.1%}, "
        f"reference {r.accuracy_reference.mean:.1%} ± {r.accuracy_reference.stderr:.1%}",
        soft_wrap=True,
    )
    if r.truncated_policy or r.truncated_reference:
        console.print(
            f"cut at max_new_tokens ({r.max_new_tokens}): policy {r.truncated_policy:.1%}, "
            f"reference {r.truncated_reference:.1%}",
            soft_wrap=True,
        )
    if "plot" in info:
        console.print(f"plot: {info['plot']}", soft_wrap=True)
