"""Every model type of transformers' causal-LM mapping, per operation: proven, or refused with its reason class.

For each model type it builds a tiny random checkpoint from the type's default config (hidden size 64, a few blocks,
every kind of block the config lists; normsurgery.adapt.tiny), saves it with transformers, and runs on it what a
user would: `inspect`, `fold` (verified exact against the original), `prune` of block 1 (verified equal to the
original with that block skipped) and, where inspect says they apply, `convert --to rmsnorm|crmsnorm` (verified
exact). Types with a declared family take the declared path; the others are traced and proven at run time, in a
fresh cache folder, so the first command of each type pays for the trace. Writes JSON lines and the Markdown table
of docs/architectures.md.

    python bench/arch_sweep.py [--types llama,glm4_moe] [--jobs 2] [--out bench/arch_sweep.jsonl]
                               [--table docs/architectures.md] [--update]

With --update, only --types are run again and their records replace theirs in --out; the table is rebuilt from all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

CLASSES = [  # (reason class, pattern of the refusal's text), first match wins
    ("not decoder-only", r"encoder-only|encoder-decoder"),
    ("composite config (text_config)", r"composite|no attribute 'num_hidden_layers'"),
    ("tiny config or model not buildable", r"could not build|could not shrink|transformers could not"),
    ("tiny forward fails", r"forward pass failed|forward pass ran"),
    ("norm read by a non-linear op", r"is read by"),
    ("writer is not a linear map", r"other than linear layers"),
    ("block output is not input + sub-layers", r"not its input plus sublayer outputs"),
    ("tensors not placed", r"does not place|neither saved as it is"),
    ("tensors converted at load beyond renames", r"converts these tensors at load"),
    ("blocks differ by index", r"depends on its index|blocks differ"),
    ("proof failed", r"proof|failed the proof"),
    ("not applicable", r"already RMSNorm|needs a zero-mean residual|Post-LN|Peri-LN|not read only through norms"),
]


# widths like transformers' own model tests use (odd MLP widths, a vocabulary that is no power of two), for --shape
# tester: checkpoints unlike the tiny instances the tracer builds itself
TESTER = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "intermediate_size": 37, "moe_intermediate_size": 13, "shared_expert_intermediate_size": 19,
          "vocab_size": 99, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2}


def reason_class(text: str) -> str:
    """The class of a refusal's text."""
    return next((name for name, pattern in CLASSES if re.search(pattern, text)), "other")


class Timeout(Exception):
    """An operation ran past its limit."""


def _alarm(*_: object) -> None:
    raise Timeout()


def tiny_checkpoint(model_type: str, folder: Path) -> None:
    """A tiny random checkpoint of a model type whose forward runs: from the type's default config made tiny (hidden
    size 64), else, where that config is inconsistent (latent attention widths, ...), the default config's own
    layout cut to a few blocks with small widths."""
    import torch

    from normsurgery.adapt.tiny import config_class, tiny_config, tiny_like, tiny_model

    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    errors = []
    overrides = None
    if os.environ.get("NORMSURGERY_SWEEP_SHAPE") == "tester":  # other widths than the tracer's own tiny instances
        native = config_class(model_type)().to_dict()
        overrides = {k: v for k, v in TESTER.items() if k in native}
    for build in (lambda: tiny_config(model_type, layers=3, overrides=overrides),
                  lambda: tiny_like(config_class(model_type)(), 4, shrink=True)):
        try:
            model = tiny_model(build())
            with torch.no_grad():
                model(ids, use_cache=False)
        except Exception as err:  # the next way, or the last error
            errors.append(err)
            continue
        model.save_pretrained(folder)
        return
    raise errors[-1]


def sweep_one(model_type: str, limit: int = 240) -> dict:
    """Build the tiny checkpoint of one model type and run every operation on it."""
    warnings.filterwarnings("ignore")
    from normsurgery import api
    from normsurgery.arch import FAMILY_BY_MODEL_TYPE
    from normsurgery.arch.facts import applicability
    from normsurgery.errors import NormSurgeryError
    from normsurgery.source import open_model

    record: dict = {"model_type": model_type, "declared": model_type in FAMILY_BY_MODEL_TYPE, "ops": {}}
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        signal.alarm(limit)
        try:
            tiny_checkpoint(model_type, folder)
        except (NormSurgeryError, Timeout, Exception) as err:  # noqa: B014 - every failure is a class of refusal
            signal.alarm(0)
            record["build"] = f"{type(err).__name__}: {err}"[:400]
            record["class"] = "tiny config or model not buildable"
            return record
        signal.alarm(0)

        def run(op: str, call) -> None:
            start = time.perf_counter()
            signal.alarm(limit)
            try:
                outcome = call()
                record["ops"][op] = {"status": "proven" if outcome in (None, True) else "failed",
                                     "detail": "" if outcome in (None, True) else str(outcome)[:300]}
            except NormSurgeryError as err:
                text = " ".join(str(err).split())
                record["ops"][op] = {"status": "refused", "class": reason_class(text), "detail": text[:400]}
            except Timeout:
                record["ops"][op] = {"status": "failed", "detail": f"over {limit} s"}
            except Exception as err:  # a crash is a bug, recorded as such
                record["ops"][op] = {"status": "crashed", "detail": f"{type(err).__name__}: {err}"[:400]}
            finally:
                signal.alarm(0)
            record["ops"][op]["seconds"] = round(time.perf_counter() - start, 2)

        applies: dict[str, bool] = {}

        def inspect() -> None:
            source = open_model(str(folder))
            try:
                record["origin"] = source.arch.origin
                record["norm"] = source.arch.all_norms()[0].kind if source.arch.all_norms() else None
                applies.update({a.operation: a.applies for a in applicability(source.arch)})
                record["applies"] = {a.operation: a.applies if a.applies else a.reason[:200]
                                     for a in applicability(source.arch)}
            finally:
                source.close()

        def verified(result) -> bool | str:
            check = result.check if hasattr(result, "check") else None
            if check is None and isinstance(result, dict):
                check = result.get("check")
                return True if check and check["passed"] else f"check failed: {check}"
            return True if check is not None and check.passed else f"check failed: {check}"

        run("inspect", inspect)
        if record["ops"]["inspect"]["status"] != "proven":
            record["class"] = record["ops"]["inspect"].get("class", "other")
            return record
        run("fold", lambda: verified(api.fold(str(folder), Path(tmp) / "fold", device="cpu")))
        if applies.get("prune"):
            run("prune", lambda: verified(api.prune(str(folder), Path(tmp) / "prune", layers=[1], device="cpu")))
        for target in ("rmsnorm", "crmsnorm"):
            if applies.get(target):
                run(target, lambda t=target: verified(api.convert(str(folder), Path(tmp) / t, to=t, device="cpu")))
    return record


def _worker(model_type: str) -> dict:
    """One type in a fresh process (a crash or a leak in one type does not reach the others)."""
    try:
        return sweep_one(model_type)
    except BaseException as err:  # noqa: BLE001 - recorded, the sweep goes on
        return {"model_type": model_type, "ops": {}, "build": f"{type(err).__name__}: {err}"[:400], "class": "other"}


def table(records: list[dict]) -> str:
    """The Markdown page: counts, then one row per model type."""
    decoders = [r for r in records if r.get("class") != "not decoder-only"]
    ok = [r for r in records if r["ops"].get("fold", {}).get("status") == "proven"]
    counts = Counter(r.get("class") or next((o.get("class", o["status"]) for o in r["ops"].values()
                                             if o["status"] != "proven"), "other")
                     for r in records if r not in ok)
    lines = [f"- model types swept: {len(records)}; decoder-only: {len(decoders)}",
             f"- inspect and fold proven exact: {len(ok)} ({sum(1 for r in ok if r.get('origin') == 'traced')} traced "
             f"at run time, {sum(1 for r in ok if r.get('origin') == 'declared')} declared)",
             f"- prune of one block proven: {sum(1 for r in records if r['ops'].get('prune', {}).get('status') == 'proven')}",
             f"- rmsnorm / crmsnorm proven on the Pre-LN LayerNorm ones: "
             f"{sum(1 for r in records if r['ops'].get('rmsnorm', {}).get('status') == 'proven')} / "
             f"{sum(1 for r in records if r['ops'].get('crmsnorm', {}).get('status') == 'proven')}",
             "", "Refused or failing, by reason class:", "", "| reason class | model types |", "|---|---|"]
    for name, n in counts.most_common():
        types = sorted(r["model_type"] for r in records if r not in ok and (r.get("class") or next(
            (o.get("class", o["status"]) for o in r["ops"].values() if o["status"] != "proven"), "other")) == name)
        lines.append(f"| {name} ({n}) | {', '.join(types)} |")
    lines += ["", "| model type | path | inspect | fold | prune | rmsnorm | crmsnorm | first trace + proof (s) |",
              "|---|---|---|---|---|---|---|---|"]

    def cell(r: dict, op: str) -> str:
        o = r["ops"].get(op)
        if o is None:
            return "-"
        return "yes" if o["status"] == "proven" else f"{o['status']}: {o.get('class', o.get('detail', '')[:60])}"

    for r in sorted(records, key=lambda r: r["model_type"]):
        path = r.get("origin", "-") if r["ops"] else f"not built ({r.get('class')})"
        seconds = r["ops"].get("inspect", {}).get("seconds", "-") if r.get("origin") == "traced" else "-"
        lines.append(f"| {r['model_type']} | {path} | " + " | ".join(cell(r, op) for op in (
            "inspect", "fold", "prune", "rmsnorm", "crmsnorm")) + f" | {seconds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: the whole causal-LM mapping)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="bench/arch_sweep.jsonl")
    parser.add_argument("--table", default="docs/architectures.md")
    parser.add_argument("--update", action="store_true", help="rerun --types only, keeping the other records")
    parser.add_argument("--shape", choices=("small", "tester"), default="small",
                        help="tester: checkpoints with the odd widths of transformers' model tests (hidden 32, MLP "
                             "37, vocabulary 99); write them to another --out and pass --table ''")
    args = parser.parse_args()
    os.environ["NORMSURGERY_SWEEP_SHAPE"] = args.shape  # read by the spawned workers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    cache = tempfile.mkdtemp(prefix="normsurgery-sweep-cache-")
    os.environ["NORMSURGERY_CACHE"] = cache  # every traced type pays its first trace here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    kept = []
    if args.update and Path(args.out).exists():
        kept = [r for r in map(json.loads, Path(args.out).read_text().splitlines()) if r["model_type"] not in types]
    records = list(kept)
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool, \
            open(args.out, "w") as out:
        out.writelines(json.dumps(r) + "\n" for r in kept)
        for record in pool.imap_unordered(_worker, types):
            records.append(record)
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(record["model_type"], record.get("origin"), {k: v["status"] for k, v in record["ops"].items()},
                  record.get("class", ""), file=sys.stderr, flush=True)
    if args.table and args.shape == "small":
        import transformers

        page = Path(args.table)
        text = page.read_text() if page.exists() else "# Architectures\n\n<!-- sweep -->\n"
        head, _, before = text.partition("<!-- sweep -->\n")
        measured = f"Measured {time.strftime('%Y-%m-%d')} with transformers {transformers.__version__}"
        if args.update:  # the whole run's line stays; this run's follows it
            previous = before.split("\n\n")[0]
            measured = (f"{previous}\n{measured}: `python bench/arch_sweep.py --update --types {args.types}` "
                        f"reran {len(types)} of them ({time.time() - start:.0f} s).")
        else:
            measured += f": `python bench/arch_sweep.py`, {args.jobs} jobs, {time.time() - start:.0f} s."
        page.write_text(head + "<!-- sweep -->\n" + measured + "\n\n" + table(records))


if __name__ == "__main__":
    main()
