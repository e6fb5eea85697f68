"""Run lm-eval in-process on an already-loaded model: our offline tasks or any stock lm-eval task.

lm_eval is imported only here and only when `eval` runs, so other commands stay fast to start. Each task is
evaluated on its own so that its time and tokens/s can be reported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgery.errors import NormSurgeryError
from normsurgery.evaluation import stats
from normsurgery.evaluation.tasks import OFFLINE_TASKS, TASKS_DIR

DEFAULT_TASKS = OFFLINE_TASKS


@dataclass
class TaskResult:
    """One task's metrics (name -> value) and their standard errors, with its size and speed."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    samples: int
    seconds: float
    tokens: int
    per_doc: dict[str, list[Any]] = field(default_factory=dict, repr=False)  # metric -> value of each document

    @property
    def tokens_per_second(self) -> float:
        """Tokens the model read per second of this task (padding included)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalRun:
    """What one model scored on a set of tasks, and how it was run."""

    model: str
    dtype: str
    device: str
    batch_size: int
    limit: int | None
    tasks: list[TaskResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON reports."""
        out = asdict(self)
        for task, result in zip(out["tasks"], self.tasks):
            task.pop("per_doc")
            task["tokens_per_second"] = result.tokens_per_second
        return out


def _lm_eval() -> Any:
    """The lm_eval package, or a clear error naming the extra that installs it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator, tasks
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise NormSurgeryError(
            "`normsurgery eval` needs lm-eval, which is not installed: pip install 'normsurgery[eval]'."
        ) from None
    # lm-eval records `git describe` of the working folder, whose git prints "fatal: not a git repository" to the
    # terminal outside one; that commit says nothing about the model, and normsurgery records its own version
    if hasattr(evaluator, "get_git_commit_hash"):
        evaluator.get_git_commit_hash = lambda: None
    return evaluator, tasks, HFLM


def offline() -> bool:
    """Whether the Hugging Face hub is out of reach (offline variables set, or no connection within 3 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return True
    return False


def task_manager(names: list[str]) -> Any:
    """lm-eval's TaskManager with our tasks; the ~14,700 stock ones are indexed only when a name needs them."""
    _, tasks, _ = _lm_eval()
    stock = [n for n in names if n not in OFFLINE_TASKS]
    manager = tasks.TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(stock))
    unknown = [n for n in stock if n not in manager.all_tasks]
    if unknown:
        raise NormSurgeryError(
            f"unknown lm-eval task(s): {', '.join(unknown)}. normsurgery's offline tasks are "
            f"{', '.join(OFFLINE_TASKS)}; stock lm-eval tasks are listed by `lm_eval ls tasks`."
        )
    if stock and offline():
        raise NormSurgeryError(
            f"task(s) {', '.join(stock)} download their data from the Hugging Face hub, which is out of reach "
            f"(offline). Use the offline tasks shipped with normsurgery instead: {', '.join(OFFLINE_TASKS)}."
        )
    return manager


def _parse(task: str, results: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Metrics of one task from lm-eval's results (keys like 'acc,none') and each document's values."""
    metrics = {}
    for key, value in results["results"][task].items():
        name, _, _filter = key.partition(",")
        if _filter and not name.endswith("_stderr") and isinstance(value, (int, float)):
            metrics[name] = float(value)
    docs = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return metrics, {m: [d[m] for d in docs] for m in metrics}


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    label: str,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    manager: Any = None,
    on_task: Callable[[str], None] | None = None,
) -> EvalRun:
    """Every task on an already-loaded model, one lm-eval run per task (for its time and speed)."""
    evaluator, _, HFLM = _lm_eval()
    manager = manager or task_manager(tasks)
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        model = model.to(device)  # lm-eval keeps a loaded model where it is
    except (RuntimeError, AssertionError, ValueError) as err:
        raise NormSurgeryError(f"cannot use --device {device}: {err}. Choose cpu or an available accelerator.") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    run = EvalRun(model=label, dtype=dtype, device=device, batch_size=batch_size, limit=limit)
    counted = [0]

    def count(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        counted[0] += int(ids.numel()) if ids is not None else 0

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        for task in tasks:
            if on_task:
                on_task(task)
            counted[0] = 0
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's own progress bars; we show ours
                results = evaluator.simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True,
                    verbosity="ERROR",
                )
            seconds = time.perf_counter() - start
            metrics, per_doc = _parse(task, results)
            errors = {m: stats.stderr(m, values) for m, values in per_doc.items()}
            samples = len(next(iter(per_doc.values()), []))
            run.tasks.append(TaskResult(task, metrics, errors, samples, seconds, counted[0], per_doc))
    except ConnectionError as err:
        raise NormSurgeryError(f"lm-eval could not download the data of a task ({err}); use the offline tasks: "
                               f"{', '.join(OFFLINE_TASKS)}.") from None
    except NormSurgeryError:
        raise
    except Exception as err:  # lm-eval raises bare assertions and many types; say which task and what
        raise NormSurgeryError(
            f"lm-eval failed on task {task} with {label}: {type(err).__name__}: {err or 'no message'}. If the task is a "
            "stock lm-eval one, run it with `lm_eval` directly to see more; if it is normsurgery's, please report it."
        ) from None
    finally:
        hook.remove()
    return run


def evaluate_path(
    folder: Path,
    tasks: list[str],
    *,
    label: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    manager: Any = None,
    **kwargs: Any,
) -> EvalRun:
    """Load a validated model folder with its tokenizer and evaluate it; the model is freed afterwards."""
    from normsurgery.engine.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise NormSurgeryError(f"{folder} has no tokenizer files; lm-eval needs the model's tokenizer. Copy "
                               "tokenizer.json (and its config) into the folder.")
    model = load_model(folder, dtype, trust_remote_code=trust_remote_code)
    return evaluate_model(model, tokenizer, tasks, label=label, manager=manager, **kwargs)
