"""The ``tether`` command line: one command per job.

Every command turns a bad input (recipe, checkpoint, run directory, argument) into a one-line
``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="tether: KL-tethered fine-tuning of language models.",
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
MAX_SEED = 2**32 - 1  # what NumPy's and a recipe's seed allow


@app.callback()
def _before_every_command() -> None:
    from transformers.utils import logging as hf_logging

    from tether.engine.allocator import keep_freed_memory

    hf_logging.disable_progress_bar()  # no "Loading weights" bars around every command
    keep_freed_memory()  # steps reuse freed pages instead of faulting new ones in


class UsageError(ValueError):
    """A bad command-line value; the message names the option."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def friendly_errors(fn: F) -> F:
    """Turn the library's input errors into ``error: ...`` and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tether.config import RecipeError
        from tether.engine.checkpoints import RunDirError
        from tether.engine.faults import NonFiniteError, TrainingInterrupted
        from tether.models.loading import ModelLoadError
        from tether.rewards.functions import RewardError
        from tether.tasks.jsonl import DatasetError

        input_errors = (RecipeError, ModelLoadError, RunDirError, DatasetError, RewardError)
        try:
            return fn(*args, **kwargs)
        except (*input_errors, UsageError) as err:
            _fail(str(err))
        except TrainingInterrupted as err:  # a checkpoint was saved; say how to go on
            typer.echo(f"interrupted: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except NonFiniteError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except FileNotFoundError as err:
            _fail(f"{err.filename}: no such file or directory")
        except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as err:
            # a path that cannot be written (most are caught up front by check_out)
            reason = err.strerror or type(err).__name__
            _fail(f"{err.filename}: {reason}" if err.filename else reason)

    return wrapper  # type: ignore[return-value]


def check_out(option: str, path: Path, file: bool = False) -> None:
    """Refuse up front an output path that cannot be written: ``path`` is a folder to use or
    create (with ``file``, a file in such a folder). A one-line UsageError naming the option,
    the path and why; nothing is left behind."""
    import tempfile

    folder = path.parent if file else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f"{existing} "
        raise UsageError(f"{option} {path}: {where}is a file, not a folder")
    try:  # the one sure test of permissions (root, read-only mounts, /proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".tether-check-", dir=existing))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if existing == folder:
            raise UsageError(f"{option} {path}: cannot write in {folder} ({reason})") from None
        raise UsageError(
            f"{option} {path}: cannot create the folder in {existing} ({reason})"
        ) from None


def parse_digits(text: str) -> list[int]:
    """``3`` or ``1-5`` -> [3] or [1, 2, 3, 4, 5]."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise UsageError(f"--digits {text!r}: expected N or LO-HI, e.g. 1-5") from None
    if not 1 <= lo <= hi <= 18:
        raise UsageError(f"--digits {text!r}: need 1 <= LO <= HI <= 18")
    return list(range(lo, hi + 1))


@app.command()
@friendly_errors
def train(
    recipe: Annotated[
        Path | None, typer.Argument(help="YAML recipe (or a packaged recipe name)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key: a.b=value (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/NAME-TIME)")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue an interrupted run from its newest checkpoint"),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train a model as a recipe says; writes a run directory.

    Ctrl-C (or SIGTERM) saves a checkpoint and stops; `--resume RUN_DIR` continues it."""
    from tether.config import load_recipe
    from tether.engine.loop import train as run

    if resume is not None:
        if recipe is not None or set_ or out is not None:
            raise UsageError(
                "--resume uses the run's own config.yaml: give no RECIPE, --set or --out with it"
            )
        cfg = load_recipe(resume / "config.yaml") if (resume / "config.yaml").is_file() else None
        if cfg is None:
            raise UsageError(f"--resume {str(resume)!r}: not a run directory (no config.yaml)")
        out = resume
    elif recipe is None:
        raise UsageError("give a RECIPE to train, or --resume RUN_DIR")
    else:
        cfg = load_recipe(recipe, set_ or [])
        out = out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_out("--out", out)
    summary = run(cfg, out, progress=not quiet, resume=resume is not None)
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"run directory: {out}  (final model: {out / 'model'})")


@app.command("eval")
@friendly_errors
def eval_(
    checkpoint: Annotated[
        str, typer.Argument(help="shipped model name, checkpoint or run directory")
    ],
    task: Annotated[
        str | None,
        typer.Option(
            help="addition, multistep... (default: the task the checkpoint was trained on)"
        ),
    ] = None,
    digits: Annotated[str, typer.Option(help="digit lengths, N or LO-HI")] = "1-5",
    n: Annotated[int, typer.Option(min=1, help="problems per length and kind")] = 1000,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="0 = greedy; > 0 = sampled Pass@1")
    ] = 0.0,
    certainty: Annotated[
        bool, typer.Option(help="also the critical-token certainty analysis (Table 1)")
    ] = False,
    max_digits: Annotated[
        int | None, typer.Option(help="N of the model (default: from the checkpoint)")
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="seed of the problems and of sampling")
    ] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    temperatures: Annotated[
        str | None,
        typer.Option(help="diversity sweep: comma-separated temperatures, e.g. 0.5,1"),
    ] = None,
    k: Annotated[int, typer.Option(min=2, help="samples per prompt for the sweep/rewards")] = 4,
    rewards: Annotated[
        bool, typer.Option(help="IQLearn reward extraction: returns vs task score (Spearman)")
    ] = False,
    exact: Annotated[
        bool,
        typer.Option(
            help="enumerable task: exact KL to the target p* ∝ π_ref·exp(r/β), entropy, reward"
        ),
    ] = False,
    reference: Annotated[
        str | None, typer.Option(help="--exact: π_ref (default: the checkpoint's init)")
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="--exact: β of the target (default: the dpg.beta used)")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON document")] = False,
) -> None:
    """Accuracy per digit length (addition) or accuracy and score (other tasks), with 95%
    intervals; optionally a diversity sweep over temperatures and the extracted rewards.
    With --exact (enumerable task): every response enumerated, exact figures against the
    target p* ∝ π_ref·exp(r/β) for the policy, the reference and the target itself."""
    from tether.eval import addition as evaluate
    from tether.models.loading import (
        checkpoint_max_digits,
        checkpoint_task,
        load_model_and_tokenizer,
        resolve_checkpoint,
    )

    if max_digits is not None and not 1 <= max_digits <= 18:
        raise UsageError(f"--max-digits {max_digits}: must lie in 1..18 (N of the model)")
    path = resolve_checkpoint(checkpoint)
    trained_on = checkpoint_task(path)
    task = task or trained_on.get("name", "addition")
    if exact:
        _eval_exact(path, task, trained_on, reference, beta, json_)
        return
    if reference is not None or beta is not None:
        raise UsageError("--reference and --beta go with --exact")
    if task != "addition" or temperatures or rewards:
        _eval_samples(path, task, trained_on, n, temperature, temperatures, k, rewards, seed, json_)
        return
    lengths = parse_digits(digits)
    model, tokenizer = load_model_and_tokenizer(str(path))
    result: dict[str, Any] = {"checkpoint": str(path), "task": task}
    result["accuracy"] = evaluate.addition_accuracy(
        model,
        tokenizer,
        lengths,
        n,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=not json_,
    )
    if certainty:
        big_n = max_digits if max_digits is not None else checkpoint_max_digits(path)
        if big_n is None:
            raise UsageError("--certainty needs --max-digits N (the checkpoint does not record it)")
        result["certainty"] = evaluate.critical_certainty(
            model, tokenizer, big_n, n, seed=seed, temperature=temperature, batch_size=batch_size
        )
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    mode = "greedy" if temperature == 0 else f"sampled Pass@1, T={temperature}"
    typer.echo(f"{path} on addition ({mode}, n={n} per cell)\n")
    typer.echo(evaluate.accuracy_table(result["accuracy"]))
    if certainty:
        typer.echo("\n" + evaluate.certainty_table(result["certainty"]))


def _parse_temperatures(text: str) -> list[float]:
    import math

    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--temperatures {text!r}: expected numbers, e.g. 0.5,1") from None
    if not values or any(not 0 <= t < math.inf for t in values):  # nan and inf too
        raise UsageError(f"--temperatures {text!r}: expected finite temperatures >= 0, e.g. 0.5,1")
    return values


def _eval_samples(
    path: Path,
    task_name: str,
    trained_on: dict[str, Any],
    n: int,
    temperature: float,
    temperatures: str | None,
    k: int,
    rewards: bool,
    seed: int,
    json_: bool,
) -> None:
    """Any task: accuracy and score; the diversity sweep; the extracted-reward correlation."""
    import random

    from tether.config import TaskConfig
    from tether.eval import imitation as ie
    from tether.models.loading import load_model_and_tokenizer
    from tether.tasks import task_from_config

    try:
        fields = {**trained_on, "name": task_name, "train_size": None}
        if task_name != trained_on.get("name"):
            fields = {"name": task_name}
        task = task_from_config(TaskConfig.model_validate(fields))
    except ValueError as err:
        raise UsageError(f"--task {task_name!r}: {_first_error(err)}") from None
    sweep_ts = _parse_temperatures(temperatures) if temperatures else [temperature]
    model, tokenizer = load_model_and_tokenizer(str(path))
    rng = random.Random(f"tether-eval/{seed}")
    problems = [task.rl_problem(rng) for _ in range(n)]
    result: dict[str, Any] = {"checkpoint": str(path), "task": task_name, "n": n, "k": k}
    result["sweep"] = ie.diversity_sweep(
        model, tokenizer, task, problems, temperatures=sweep_ts, k=k, seed=seed
    )
    if rewards:
        corr = ie.reward_correlation(
            model, tokenizer, task, problems, k=k, temperature=max(temperature, 1.0), seed=seed
        )
        examples = []
        for i in range(min(3, len(corr["completions"]))):
            prompt = problems[corr["prompt_index"][i]].prompt
            pairs = ie.per_token_rewards(
                model, tokenizer, prompt, corr["completions"][i], add_eos=corr["finished"][i]
            )
            examples.append({"prompt": prompt, "tokens": ie.format_token_rewards(pairs)})
        result["rewards"] = {
            key: corr[key]
            for key in ("spearman_rho", "p_value", "spearman_rho_within", "n", "mean_return")
        }
        result["reward_examples"] = examples
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{path} on {task_name} ({n} prompts x {k} samples)\n")
    typer.echo(ie.seeds_table({"model": [result["sweep"]]}))
    if rewards:
        r = result["rewards"]
        typer.echo(
            f"\nextracted reward vs task score: Spearman rho = {r['spearman_rho']:.3f} "
            f"(p = {r['p_value']:.2g}, n = {r['n']}); within prompts {r['spearman_rho_within']:.3f}"
        )
        for ex in result["reward_examples"]:
            typer.echo(f"\n{ex['prompt']}\n  {ex['tokens']}")


def _parse_ns(text: str) -> list[int]:
    """``1,2,4,8`` -> [1, 2, 4, 8] (sorted, no repeats); a one-line error for anything else."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(
            f"--n {text!r}: expected positive integers separated by commas, e.g. 1,2,4,8"
        ) from None
    if any(v < 1 for v in values):
        raise UsageError(f"--n {text!r}: every N must be a positive integer (1 = plain sampling)")
    return sorted(set(values))


def _first_error(err: Exception) -> str:
    """The first message of a pydantic ValidationError (else the first line), without the
    "Value error, " prefix."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return f"{loc}: {message}" if loc and not message.startswith(loc) else message
    from tether.config import first_line

    return first_line(err)


@app.command()
@friendly_errors
def winrate(
    policy: Annotated[
        str, typer.Argument(help="the policy: shipped model name, checkpoint or run directory")
    ],
    reference: Annotated[
        str | None,
        typer.Option(help="π_ref (default: the model the policy was trained from, its init)"),
    ] = None,
    ns: Annotated[
        str, typer.Option("--n", help="comma-separated N of best/worst-of-N decoding")
    ] = "1,2,4,8,16",
    mode: Annotated[str, typer.Option(help="best (best-of-N) or worst (worst-of-N)")] = "best",
    prompts: Annotated[int, typer.Option(min=2, help="prompts drawn from the task")] = 64,
    samples: Annotated[int, typer.Option(min=1, help="samples per prompt and model (M)")] = 32,
    temperature: Annotated[float, typer.Option(help="sampling temperature, > 0")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    reward: Annotated[
        str | None,
        typer.Option(
            "--reward",
            help="checker, graded, python or model (default: the policy's reward section)",
        ),
    ] = None,
    reward_function: Annotated[
        str | None, typer.Option(help="python reward: 'package.module:name' or 'file.py:name'")
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option(help="model reward: a reward-model checkpoint or run directory")
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="the task (default: the one the policy was trained on)")
    ] = None,
    max_digits: Annotated[
        int | None, typer.Option(min=1, max=18, help="the task's max_digits")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="default: the task's budget")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="rows sampled at once")] = 64,
    json_: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of win rate against N")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads")] = None,
) -> None:
    """InfAlign's inference-time win rate: the policy's best-of-N (or worst-of-N) against the
    reference decoded the same way, judged by the reward, for each N; with KL(policy||reference)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from tether.config import Recipe, RewardConfig, TaskConfig
    from tether.eval.winrate import evaluate_winrate, plot_winrate
    from tether.models.loading import (
        ModelLoadError,
        checkpoint_meta,
        load_model_and_tokenizer,
        resolve_checkpoint,
    )
    from tether.rewards.functions import RewardError, build_reward
    from tether.tasks import task_from_config

    n_values = _parse_ns(ns)
    if mode not in ("best", "worst"):
        raise UsageError(f"--mode {mode!r}: choose best or worst")
    if not temperature > 0:
        raise UsageError(f"--temperature {temperature}: must be > 0 (best-of-N needs samples)")
    if plot is not None:
        check_out("--plot", plot, file=True)
    if threads:
        torch.set_num_threads(threads)

    path = resolve_checkpoint(policy)
    meta = checkpoint_meta(path)
    reference_name = reference or meta.get("init")
    if not reference_name:
        raise UsageError(
            f"{policy}: no reference model recorded in its tether.json (no init): pass "
            "--reference REF (the model it was trained from)"
        )

    trained_on = dict(meta.get("task") or {})
    task_name = task or trained_on.get("name", "addition")
    fields: dict[str, Any] = {"name": task_name}
    if task_name == trained_on.get("name"):
        fields = {**trained_on, "train_size": None}
    if max_digits is not None:
        fields["max_digits"] = max_digits
    try:
        task_cfg = TaskConfig.model_validate(fields)
        task_obj = task_from_config(task_cfg)
    except ValueError as err:
        raise UsageError(f"--task {task_name!r}: {_first_error(err)}") from None

    saved = dict(meta.get("reward") or {})
    kind = reward or (
        "python" if reward_function else "model" if reward_model else saved.get("kind", "checker")
    )
    if kind not in ("checker", "graded", "python", "model"):
        raise UsageError(f"--reward {kind!r}: choose checker, graded, python or model")
    if reward_function and kind != "python":
        raise UsageError(f"--reward-function is for --reward python (the reward is {kind})")
    if reward_model and kind != "model":
        raise UsageError(f"--reward-model is for --reward model (the reward is {kind})")
    function = reward_function or (saved.get("function") if kind == "python" else None)
    model_path = reward_model or (saved.get("model") if kind == "model" else None)
    if kind == "python" and not function:
        raise UsageError("--reward python needs --reward-function 'module:name' or 'file.py:name'")
    if kind == "model" and not model_path:
        raise UsageError("--reward model needs --reward-model PATH (a reward-model checkpoint)")
    try:
        # the raw reward only: calibration is a monotone map per prompt, the win rate ignores it
        reward_cfg = RewardConfig(kind=kind, function=function, model=model_path)
        reward_fn = build_reward(Recipe(task=task_cfg, reward=reward_cfg), task_obj)
    except RewardError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        raise UsageError(f"--reward {kind}: {_first_error(err)}") from None

    policy_model, tokenizer = load_model_and_tokenizer(str(path))
    try:
        reference_model, reference_tokenizer = load_model_and_tokenizer(reference_name)
    except ModelLoadError as err:
        if reference:
            raise
        raise UsageError(
            f"the reference recorded as the policy's init cannot be loaded ({err}): "
            "pass --reference REF"
        ) from None
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(
            f"the reference {reference_name!r} has a different tokenizer from the policy: "
            "the KL and a fair comparison need the same one"
        )

    try:
        report = evaluate_winrate(
            policy_model,
            reference_model,
            tokenizer,
            task_obj,
            reward_fn,
            ns=n_values,
            mode=mode,  # type: ignore[arg-type]
            prompts=prompts,
            samples=samples,
            temperature=temperature,
            seed=seed,
            max_new_tokens=max_new_tokens,
            progress=not json_,
            batch_size=batch_size,
        )
    except RewardError as err:
        raise UsageError(str(err)) from None
    report.label = policy
    report.info = {
        "policy": str(path),
        "reference": str(reference_name),
        "task": task_cfg.model_dump(exclude_defaults=True) | {"name": task_cfg.name},
        "reward": {
            k: v for k, v in reward_cfg.model_dump().items() if k in ("kind", "function", "model")
        },
    }
    if plot is not None:
        report.info["plot"] = str(plot_winrate(report, plot))
    if json_:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return

    console = Console(highlight=False)
    console.print(
        f"policy {path}\nreference {reference_name}\n"
        f"task {task_cfg.name}, reward {kind}, T={temperature:g}, "
        f"{prompts} prompts x {samples} samples per model",
        soft_wrap=True,
    )
    table = Table(title=f"win rate, {mode}-of-N vs {mode}-of-N")
    table.add_column("N", justify="right")
    table.add_column("from CDFs ± se", justify="right")
    table.add_column("Monte Carlo ± se", justify="right")
    table.add_column("games", justify="right")
    for p in report.points:
        mc = "-" if p.mc is None else f"{p.mc.rate:.3f} ± {p.mc.stderr:.3f}"
        games = "-" if p.mc is None else str(p.mc.games)
        table.add_row(str(p.n), f"{p.cdf.mean:.3f} ± {p.cdf.stderr:.3f}", mc, games)
    console.print(table)
    r = report
    console.print(
        f"KL(policy || reference) at T={temperature:g}: {r.kl.mean:.4g} ± {r.kl.stderr:.2g} nats "
        "per sequence (k1 estimate)\n"
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
    if plot is not None:
        console.print(f"plot: {report.info['plot']}", soft_wrap=True)


def _exact_setup(
    path: Path,
    task_name: str,
    trained_on: dict[str, Any],
    reference: str | None,
    beta: float | None,
) -> tuple[Any, str, float | None, dict[str, float]]:
    """The task, the reference's name, β (None: a hard-constraint or moment target) and the
    moment targets (empty unless the run used dpg.target moments and no --beta is given) for
    --exact, from the options or else from the checkpoint's tether.json; UsageError saying
    what is missing."""
    from pydantic import ValidationError

    from tether.config import TaskConfig
    from tether.models.loading import checkpoint_meta
    from tether.tasks import task_from_config

    if task_name != "enumerable":
        raise UsageError(
            f"--exact lists every response, which only the enumerable task allows; "
            f"{path} is evaluated on {task_name} (train on task.name enumerable, or pass "
            "--task enumerable)"
        )
    fields = {**trained_on, "train_size": None} if trained_on.get("name") == task_name else {}
    try:
        task = task_from_config(TaskConfig.model_validate({**fields, "name": task_name}))
    except ValidationError as err:
        message = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(f"--exact: {message}") from None
    meta = checkpoint_meta(path)
    reference = reference or meta.get("init")
    if reference is None:
        raise UsageError(
            f"--exact: {path} records no reference (no init in its tether.json): "
            "give --reference REF"
        )
    recorded = dict(meta.get("dpg") or {})
    if beta is None and recorded.get("target") == "moments":
        return task, reference, None, dict(recorded["moments"])
    if beta is not None:
        if not beta > 0:
            raise UsageError(f"--beta {beta}: must be > 0")
    elif recorded.get("target") != "constraint":
        beta = recorded.get("beta")
        if beta is None:
            raise UsageError(
                f"--exact: give --beta B, the target's temperature ({path} was not trained "
                "by the dpg stage, which records it)"
            )
    return task, reference, beta, {}


def _eval_exact(
    path: Path,
    task_name: str,
    trained_on: dict[str, Any],
    reference: str | None,
    beta: float | None,
    json_: bool,
) -> None:
    """Exact figures of the policy, the reference and the target over the enumerated space."""
    from tether.distributions.enumeration import (
        ExactTarget,
        NotEnumerableError,
        exact_figures,
        exact_space,
        top_responses,
    )
    from tether.models.loading import ModelLoadError, load_model_and_tokenizer

    task, ref_name, beta, moments = _exact_setup(path, task_name, trained_on, reference, beta)
    model, tokenizer = load_model_and_tokenizer(str(path))
    try:
        ref_model, _ = load_model_and_tokenizer(ref_name)
    except ModelLoadError as err:
        source = "--reference" if reference else "the checkpoint's init; give --reference"
        raise UsageError(f"reference ({source}): {err}") from None
    try:
        space = exact_space(task, tokenizer)
    except NotEnumerableError as err:
        raise UsageError(f"--exact: {err}") from None
    log_ref = space.distribution(ref_model).log_probs
    if moments:  # the run's moment target, with λ solved exactly over the enumerated space
        import torch

        from tether.distributions.bayes import fit_moments, moment_log_target
        from tether.tasks.features import feature_matrix

        phi = feature_matrix(list(moments), space.texts)
        targets = torch.tensor(list(moments.values()), dtype=torch.float64)
        lam = fit_moments(phi, targets, log_weights=log_ref.detach().double()).lam
        target = ExactTarget.from_log_target(log_ref, moment_log_target(log_ref, phi, lam))
    else:
        target = ExactTarget.build(space, log_ref, beta)
    log_pi = space.distribution(model).log_probs
    columns = {"policy": log_pi, "reference": target.log_ref, "target": target.log_target}
    figures = {name: exact_figures(lp, space, target) for name, lp in columns.items()}
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "reference": ref_name,
        "task": {"name": task_name, "max_digits": task.max_digits},
        "responses": len(space),
        "target": "moments" if moments else "reward" if beta is not None else "constraint",
        "moments": moments or None,
        "beta": beta,
        "log_z": target.log_z,
        "figures": figures,
        "top_responses": top_responses(log_pi, space, target),
    }
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    if moments:
        form = "π_ref·exp(λ·φ) with means " + ", ".join(f"{k} = {v:g}" for k, v in moments.items())
    elif beta is not None:
        form = f"π_ref·exp(r/β), β = {beta:g}"
    else:
        form = "π_ref·[correct]"
    typer.echo(
        f"{path} on enumerable: all {len(space)} responses to {task.prompt!r} "
        f"(0-{task.max_digits} digits from {task.vocabulary} then EOS, or {task.max_len} cut "
        "at the limit)\n"
        f"reference: {ref_name}\ntarget: p* ∝ {form}, log Z = {target.log_z:.4f}\n"
    )
    rows = [
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
    ]
    typer.echo(f"{'π =':<26}{'policy':>10}{'reference':>11}{'target':>10}")
    for key, label in rows:
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


@app.command()
@friendly_errors
def sample(
    checkpoint: Annotated[
        str, typer.Argument(help="shipped model name, checkpoint or run directory")
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
    json_: Annotated[bool, typer.Option("--json", help="print one JSON document")] = False,
) -> None:
    """Generate completions for prompts (or for random addition problems)."""
    import random

    import torch

    from tether.generation.sampler import sample as run_sampler
    from tether.models.loading import load_model_and_tokenizer
    from tether.tasks import addition

    problems: list[addition.Problem | None]
    if prompt:
        prompts = [p.replace("\\n", "\n") for p in prompt]
        if not all(prompts):
            raise UsageError("--prompt '': empty; give the text to complete")
        problems = [None] * len(prompts)
    elif digits is not None:
        if not 1 <= digits <= 18:
            raise UsageError(f"--digits {digits}: need 1..18")
        rng = random.Random(seed)
        problems = [addition.equal_length_problem(rng, digits) for _ in range(count)]
        prompts = [p.prompt for p in problems if p is not None]
    else:
        raise UsageError("give --prompt TEXT or --digits N")
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    gen = torch.Generator().manual_seed(seed)
    out = run_sampler(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        generator=gen,
    )
    rows = []
    for i, (p, text) in enumerate(zip(prompts, out.texts, strict=False)):
        row: dict[str, Any] = {"prompt": p, "completion": text, "finished": out.finished[i]}
        row["logprob"] = float(out.logprobs[i][out.completion_mask[i].bool()].sum())
        prob = problems[i]
        if prob is not None:
            row["correct"] = addition.is_correct(prob, text)
        rows.append(row)
    if json_:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        verdict = "" if "correct" not in row else ("  [correct]" if row["correct"] else "  [wrong]")
        typer.echo(f"--- log p = {row['logprob']:.3f}{verdict}\n{row['prompt']}{row['completion']}")


@app.command()
@friendly_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories")],
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="output folder (default: the first run's report/)"),
    ] = None,
) -> None:
    """Plots of loss and evaluation curves, runs overlaid, and a table of final figures."""
    from tether.eval.report import make_report

    for d in run_dirs:
        if not d.is_dir():
            raise UsageError(f"{d}: not a run directory")
    out = out or run_dirs[0] / "report"
    check_out("--out", out)
    try:
        path = make_report(run_dirs, out)
    except ValueError as err:
        raise UsageError(str(err)) from err
    typer.echo(f"report: {path}")


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/demo-TIME)")] = None,
    full: Annotated[bool, typer.Option(help="the larger setting: 10 seeds, 80 steps")] = False,
    seeds: Annotated[int | None, typer.Option(min=1, help="override the number of seeds")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="override the RL steps per run")] = None,
    certainty_exponent: Annotated[
        float, typer.Option(min=0.0, help="β_c of the prioritised KL")
    ] = 150.0,
    sweep: Annotated[
        bool, typer.Option(help="one prioritised arm per β_c in 10, 50, 150, 500, 1000, 10000")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key in every arm")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """The critical-token experiment at a small scale: standard vs prioritised KL, several seeds."""
    from tether.studies.demo import is_demo_folder, run_demo

    out = out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out("--out", out)
    if out.exists() and any(out.iterdir()) and not is_demo_folder(out):
        raise UsageError(f"--out {out}: already exists and is not empty (and holds no demo runs)")
    report = run_demo(
        out,
        full=full,
        seeds=seeds,
        steps=steps,
        certainty_exponent=certainty_exponent,
        sweep=sweep,
        overrides=set_ or [],
        progress=not quiet,
        echo=typer.echo,
    )
    typer.echo((report.parent / "comparison.md").read_text())
    typer.echo(f"report: {report}  (plot: {report.parent / 'comparison.png'})")


bench_app = typer.Typer(help="Speed benchmarks that print figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("imitation")
@friendly_errors
def bench_imitation(
    steps: Annotated[int, typer.Option(min=1, help="timed repeats of each variant")] = 20,
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    json_: Annotated[bool, typer.Option("--json", help="print JSON only")] = False,
) -> None:
    """What IQLearn costs over MLE: the objective alone on one batch, and whole steps
    (offline and online IQLearn), on the imitation-multistep model."""
    from tether.bench.trl import bench_imitation as run_bench

    result = run_bench(steps=steps, batch_size=batch_size)
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    o = result["objective_s"]
    typer.echo(
        f"objective (forward+loss+backward, same batch of {batch_size}): "
        f"MLE {o['mle'] * 1e3:.1f} ms, IQLearn {o['iqlearn'] * 1e3:.1f} ms, "
        f"ratio {result['objective_ratio']:.3f}"
    )
    for name, sec in result["step_s"].items():
        typer.echo(
            f"step {name:>15}: {sec * 1e3:7.1f} ms  {result['tokens_per_s'][name]:9.0f} tokens/s"
            f"  x{result['step_ratio'][name]:.3f} of MLE"
        )


@bench_app.command("rl")
@friendly_errors
def bench_rl(
    model: Annotated[str, typer.Option(help="checkpoint for policy and reference")] = "addition-n3",
    prompts: Annotated[int, typer.Option(min=1, help="prompts per step")] = 8,
    group: Annotated[int, typer.Option(min=2, help="completions per prompt")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 300,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    steps: Annotated[int, typer.Option(min=1, help="timed steps, after one warm-up step")] = 3,
    json_: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """The same RL job in tether and in TRL's GRPOTrainer: completions/s and their ratio."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UsageError("tether bench rl needs TRL: pip install 'tether[bench]'") from None
    from tether.bench.trl import RLJob
    from tether.bench.trl import bench_rl as run_bench

    result = run_bench(RLJob(model, prompts, group, max_new_tokens, temperature, steps))
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    split = result["tether"]["split"]
    typer.echo(
        f"tether: {result['tether']['completions_per_s']:.2f} completions/s "
        f"(sampling {split['sample_s']:.0%}, reference {split['reference_s']:.0%}, update {split['update_s']:.0%})\n"
        f"TRL GRPOTrainer: {result['trl_grpo']['completions_per_s']:.2f} completions/s\n"
        f"ratio: {result['ratio']:.2f}x"
    )


def _choices(option: str, given: list[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    for name in given or []:
        if name not in allowed:
            raise UsageError(f"{option} {name!r}: choose from {', '.join(allowed)}")
    return tuple(given or allowed)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return name


# options `bench steps` and `bench trl` share
BenchModel = Annotated[str, typer.Option(help="checkpoint of the policy and reference")]
BenchGroup = Annotated[int, typer.Option(min=2, help="RL: completions per prompt")]
BenchMaxNew = Annotated[int, typer.Option(min=1, help="RL: completion length")]
BenchSteps = Annotated[int, typer.Option(min=1, help="timed steps, after one warm-up step")]
BenchThreads = Annotated[int, typer.Option(min=1, help="torch threads")]
JsonOnly = Annotated[bool, typer.Option("--json", help="print the figures as JSON only")]
BenchCompile = Annotated[
    bool, typer.Option("--compile", help="train.compile: torch.compile, two warm-up steps")
]


@bench_app.command("steps")
@friendly_errors
def bench_steps(
    stage: Annotated[
        list[str] | None, typer.Option(help="mle, iqlearn, rl or dpo; repeat it (default all)")
    ] = None,
    model: BenchModel = "addition-n3",
    width: Annotated[
        int | None,
        typer.Option(min=8, help="a random Llama of this width instead of --model"),
    ] = None,
    layers: Annotated[int, typer.Option(min=1, help="with --width: its layers")] = 4,
    batch_size: Annotated[
        int, typer.Option(min=2, help="sequences per step (RL: completions; DPO: pairs)")
    ] = 64,
    group: BenchGroup = 4,
    max_new_tokens: BenchMaxNew = 300,
    steps: BenchSteps = 3,
    threads: BenchThreads = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate/--in-process",
            help="each stage in a fresh process (honest peak memory) or all in this one",
        ),
    ] = True,
    profile: Annotated[
        bool, typer.Option(help="also profile one step: time in matmuls, attention, the rest")
    ] = False,
    compile_: BenchCompile = False,
    precision: Annotated[
        str, typer.Option(help="fp32, or bf16: the forward passes under autocast")
    ] = "fp32",
    json_: JsonOnly = False,
) -> None:
    """One whole training step of each stage (MLE, IQLearn, RL with sampling and reference
    scoring, DPO): tokens/s, achieved matmul FLOP/s (FlopCounterMode), its share of this
    machine's measured peak matmul FLOP/s (fp32, or bf16 with --precision bf16) at the same
    thread count, and peak memory."""
    from tether.bench.steps import STAGES, StepsJob, bench_model
    from tether.bench.steps import bench_steps as run_bench

    stages = _choices("--stage", stage, STAGES)
    if width is not None and width % 8:
        raise UsageError(
            f"--width {width}: must be a multiple of 8 (4 attention heads, each of an even size)"
        )
    (precision,) = _choices("--precision", [precision], ("fp32", "bf16"))
    with bench_model(model, width, layers) as path:
        job = StepsJob(
            path,
            batch_size,
            group,
            max_new_tokens,
            steps,
            threads,
            0,
            _device(device),
            compile_,
            precision,
        )
        try:
            result = run_bench(job, stages, isolate=isolate, profile=profile)
        except ValueError as err:
            raise UsageError(str(err)) from None
    result["job"]["model"] = (
        model if width is None else f"random llama, width {width}, {layers} layers"
    )
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    from tether.bench.steps import print_steps

    print_steps(result)


@bench_app.command("trl")
@friendly_errors
def bench_trl(
    job: Annotated[
        list[str] | None, typer.Option(help="sft, rl or dpo; repeat it (default all three)")
    ] = None,
    model: BenchModel = "addition-n3",
    batch_size: Annotated[int, typer.Option(min=2, help="SFT: sequences, DPO: pairs")] = 64,
    prompts: Annotated[int, typer.Option(min=1, help="RL: prompts per step")] = 8,
    group: BenchGroup = 4,
    max_new_tokens: BenchMaxNew = 300,
    steps: BenchSteps = 3,
    threads: BenchThreads = 2,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile", help="SFT and DPO: torch.compile on both sides (TRL's torch_compile)"
        ),
    ] = False,
    rounds: Annotated[
        int,
        typer.Option(
            min=1, help="run each job this many times, the sides alternating; report the median"
        ),
    ] = 1,
    json_: JsonOnly = False,
) -> None:
    """tether against TRL on the same jobs, one side right after the other: SFT (SFTTrainer
    vs the mle stage), RL (GRPOTrainer vs the rl stage with RLOO, as `bench rl`) and DPO
    (DPOTrainer vs the dpo stage). Same model, examples, order and batch; fp32, no gradient
    checkpointing. Prints examples/s of whole steps and the ratio tether / TRL (with
    --rounds, the median round and every round's ratio)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UsageError("tether bench trl needs TRL: pip install 'tether[bench]'") from None
    from tether.bench.steps import TRL_JOBS, StepsJob
    from tether.bench.steps import bench_trl as run_bench

    jobs = _choices("--job", job, TRL_JOBS)
    spec = StepsJob(model, batch_size, group, max_new_tokens, steps, threads, compile=compile_)
    result = run_bench(spec, jobs, prompts=prompts, rounds=rounds)
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    from tether.bench.steps import print_trl

    print_trl(result)


@app.command()
@friendly_errors
def models(json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the checkpoints shipped with tether (usable wherever a checkpoint is asked for)."""
    from tether.models.loading import shipped_models

    shipped = shipped_models()
    if json_:
        typer.echo(json.dumps(shipped, indent=2))
        return
    if not shipped:
        typer.echo("no shipped models")
    for name, info in shipped.items():
        typer.echo(f"{name}\n  {info.get('description', '')}\n  path: {info['path']}")


study_app = typer.Typer(
    help="Multi-run studies that reproduce a paper's claims.", no_args_is_help=True
)
app.add_typer(study_app, name="study")


@study_app.command("imitation")
@friendly_errors
def study_imitation(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/imitation"),
    part: Annotated[
        list[str] | None, typer.Option(help="tradeoff and/or small-data (default both)")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1)] = 3,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps per run")] = None,
    train_size: Annotated[int, typer.Option(min=1, help="small-data: training problems")] = 256,
    prompts: Annotated[int, typer.Option(min=1, help="held-out prompts per evaluation")] = 64,
    k: Annotated[int, typer.Option(min=2, help="samples per prompt")] = 4,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """MLE vs MLE + entropy vs IQLearn (λ sweep, online) on multistep sums: score against
    Self-BLEU over temperatures, reward-score correlation, and the small-data setting."""
    from tether.studies.imitation import PARTS, run_imitation_study

    check_out("--out", out)

    parts = tuple(part or PARTS)
    for name in parts:
        if name not in PARTS:
            raise UsageError(f"--part {name!r}: choose from {', '.join(PARTS)}")
    for report in run_imitation_study(
        out,
        parts,
        seeds=seeds,
        steps=steps,
        train_size=train_size,
        n_prompts=prompts,
        k=k,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    ):
        typer.echo(report.read_text())


def _number_list(
    option: str, text: str, kind: type, noun: str, lowest: float, example: str
) -> list:
    """``0.3,1,3`` -> [0.3, 1.0, 3.0] as ``kind`` (float or int), each at least ``lowest``;
    a one-line error naming the option otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated {noun}") from None
    if not values or any(not v >= lowest for v in values):
        adjective = "non-negative" if lowest == 0 else "positive"
        raise UsageError(f"{option} {text!r}: expected {adjective} {noun}, e.g. {example}")
    return values


def _floats(option: str, text: str) -> list[float]:
    return _number_list(option, text, float, "numbers", 0, "0.3,1,3")


def _ints(option: str, text: str) -> list[int]:
    return _number_list(option, text, int, "integers", 1, "8,32,128")


@study_app.command("ctrl")
@friendly_errors
def study_ctrl(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/ctrl"),
    kl_coefs: Annotated[str, typer.Option(help="rl.kl_coef values, comma-separated")] = "0.3,1,3",
    seeds: Annotated[int, typer.Option(min=1)] = 1,
    first_seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="seeds first_seed..+seeds-1")
    ] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps per run")] = None,
    prompts: Annotated[int, typer.Option(min=2, help="held-out prompts per evaluation")] = 64,
    samples: Annotated[int, typer.Option(min=1, help="samples per prompt and model")] = 16,
    frontier_samples: Annotated[
        int, typer.Option(min=2, help="reference samples per prompt for the optimum frontier")
    ] = 64,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """KL-RL on the raw reward vs the calibrated reward vs CTRL's best-of-4 transform on
    4-digit addition: best-of-N win rate against the reference, at matched KL."""
    from tether.studies.preferences import run_ctrl_study

    check_out("--out", out)

    report = run_ctrl_study(
        out,
        _floats("--kl-coefs", kl_coefs),
        seeds=seeds,
        first_seed=first_seed,
        steps=steps,
        prompts=prompts,
        samples=samples,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
        frontier_samples=frontier_samples,
    )
    typer.echo(report.read_text())


@study_app.command("xpo")
@friendly_errors
def study_xpo(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/xpo"),
    alphas: Annotated[str, typer.Option(help="XPO α values, comma-separated")] = "0.001,0.01",
    seeds: Annotated[int, typer.Option(min=1)] = 2,
    first_seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="seeds first_seed..+seeds-1")
    ] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps per run")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Online DPO vs XPO on 4-digit addition at T = 1.5, where the reference rarely solves a
    problem: on-policy accuracy against samples drawn."""
    from tether.studies.preferences import run_xpo_study

    check_out("--out", out)

    report = run_xpo_study(
        out,
        _floats("--alphas", alphas),
        seeds=seeds,
        first_seed=first_seed,
        steps=steps,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    )
    typer.echo(report.read_text())


@study_app.command("collapse")
@friendly_errors
def study_collapse(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/collapse"),
    steps: Annotated[int, typer.Option(min=1, help="training steps per arm")] = 300,
    eval_every: Annotated[int, typer.Option(min=1, help="steps between exact evaluations")] = 25,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every arm: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Distribution collapse on the enumerable task: reward maximisation, KL-RL at several β,
    DPG and f-DPG (JS), all judged exactly against the same target p* ∝ π_ref·exp(r/0.1)."""
    from tether.studies.collapse import run_collapse_study

    check_out("--out", out)

    report = run_collapse_study(
        out,
        steps=steps,
        eval_every=eval_every,
        seed=seed,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    )
    typer.echo(report.read_text())


@study_app.command("demo-rl")
@friendly_errors
def study_demo_rl(
    out: Annotated[Path, typer.Option(help="study folder")] = Path("runs/demo-rl"),
    num_demos: Annotated[
        str, typer.Option(help="N_E values (demonstrations), comma-separated")
    ] = "8,32,128,512",
    betas: Annotated[
        str, typer.Option(help="KL coefficients β, comma-separated")
    ] = "0.01,0.03,0.1,0.3,1",
    expert_shares: Annotated[
        str, typer.Option(help="the expert's share of best answers, comma-separated")
    ] = "0.9,0.6",
    seeds: Annotated[int, typer.Option(min=1, help="demonstration draws (one clone each)")] = 4,
    rl_seeds: Annotated[int, typer.Option(min=1, help="KL-RL runs per clone and β")] = 3,
    smoothing: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="label smoothing ε of the cloning")
    ] = 0.05,
    bc_steps: Annotated[int, typer.Option(min=1, help="behaviour-cloning steps")] = 200,
    rl_steps: Annotated[int, typer.Option(min=1, help="KL-RL steps (the RL budget)")] = 40,
    samples: Annotated[int, typer.Option(min=2, help="KL-RL samples per step")] = 4,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: a.b=value")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Demonstration-regularised RL on the enumerable task: label-smoothed behaviour cloning on
    N_E expert answers, then KL-RL toward the clone, swept over N_E and β; the best β per N_E."""
    from tether.studies.demo_rl import Grid, run_demo_rl_study

    check_out("--out", out)

    grid = Grid(
        num_demos=tuple(_ints("--num-demos", num_demos)),
        betas=tuple(_floats("--betas", betas)),
        expert_shares=tuple(_floats("--expert-shares", expert_shares)),
        seeds=seeds,
        rl_seeds=rl_seeds,
        smoothing=smoothing,
        bc_steps=bc_steps,
        rl_steps=rl_steps,
        samples=samples,
    )
    report = run_demo_rl_study(
        out,
        grid,
        overrides=set_ or [],
        progress=not quiet,
        echo=lambda m: typer.echo(m, err=True),
    )
    typer.echo(report.read_text())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
