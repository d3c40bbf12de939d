"""``tether sample``: completions of prompts, or of random addition problems
(:func:`tether.generation.texts.sample_completions`)."""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Annotated, Any

import typer

from tether.cli.common import (
    MAX_SEED,
    ChatTemplateOption,
    SystemPromptOption,
    UsageError,
    echo_json,
    friendly_errors,
    prompt_format_option,
)
from tether.generation.texts import sample_completions
from tether.tasks import addition

app = typer.Typer(add_completion=False)


@app.command()
@friendly_errors
def sample(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="shipped or installed model name (tether models), checkpoint, run directory "
            "or Hugging Face folder"
        ),
    ],
    prompt: Annotated[
        list[str] | None, typer.Option(help="prompt text (repeatable); \\n is a newline")
    ] = None,
    digits: Annotated[
        int | None, typer.Option(help="sample addition problems of this many digits")
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="problems to draw with --digits")] = 4,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 512,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    chat_template: ChatTemplateOption = None,
    system_prompt: SystemPromptOption = None,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON document")] = False,
) -> None:
    """Generate completions for prompts (or for random addition problems)."""
    problems: list[addition.Problem] = []
    if prompt:
        prompts = [p.replace("\\n", "\n") for p in prompt]
        if not all(prompts):
            raise UsageError("--prompt '': empty; give the text to complete")
    elif digits is not None:
        if not 1 <= digits <= 18:
            raise UsageError(f"--digits {digits}: need 1..18")
        rng = random.Random(seed)
        problems = [addition.equal_length_problem(rng, digits) for _ in range(count)]
        prompts = [p.prompt for p in problems]
    else:
        raise UsageError("give --prompt TEXT or --digits N")
    completions = sample_completions(
        checkpoint,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        prompt_format=prompt_format_option(checkpoint, chat_template, system_prompt),
    )
    rows: list[dict[str, Any]] = [asdict(c) for c in completions]
    for row, problem in zip(rows, problems, strict=False):  # --digits: judge the answers
        row["correct"] = addition.is_correct(problem, row["completion"])
    if json_:
        echo_json(rows)
        return
    for row in rows:
        verdict = "" if "correct" not in row else ("  [correct]" if row["correct"] else "  [wrong]")
        typer.echo(f"--- log p = {row['logprob']:.3f}{verdict}\n{row['prompt']}{row['completion']}")
