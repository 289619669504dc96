"""Zero-shot runs: a chat model calls each selected cell sensitive or resistant; scored and stored.

This is scDrugMap's GPT-4o-mini evaluation (arXiv 2505.05612, ``code/GPT4/main.py``) as a
command, against any OpenAI-compatible chat-completions endpoint:

select cells (``cohort`` view) -> each cell's top-N genes from its dataset's verified source
file -> batches of ``cells_per_request`` cells of one dataset -> cache lookup -> cost guard ->
requests in a small thread pool, answers cached as they arrive -> parse -> score per dataset
with the probe metrics -> one probe run (``probe_runs`` + ``probe_results``), written at the
end in one transaction, so it shows in the leaderboard under protocol ``zero-shot``.

Choices, and where they differ from the paper:

* **order**: within a dataset, cells are put in a seeded random order before batching (a
  source file is often sorted by sample or condition, so consecutive cells would share a
  label and a batch could be answered "all 1" for free). Each cell's sort key depends only
  on the seed, its dataset and its row, so a narrower ``--where`` keeps the relative order;
* **last batch**: a dataset's last, shorter batch is sent; the paper's loop dropped it;
* **temperature 0**, where the paper used the API default, so that runs repeat;
* **labels**: 1 = sensitive, 0 = resistant, as the paper asks. A cell whose batch got no
  valid answer (no ``{res:...}``, or not exactly one 0/1 per cell) is counted and reported
  per dataset (``reason``) and in the run's notes, and not scored (the paper skipped such
  batches too);
* **metrics**: those of the probes (:func:`scdrugmap.probe.metrics.score`), one split per
  dataset, with the same positive class (``resistant`` by default). A chat model gives hard
  0/1 answers, no probabilities, so AUROC and AUPRC are computed on those hard predictions
  (as in the paper): AUROC then equals balanced accuracy.
"""

from __future__ import annotations

import os
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import UserError
from ..probe.metrics import score
from ..probe.run import ProbeRun, _results_frame, _save
from ..probe.splits import labelled_cells
from ..progress import progress_bar
from ..store.store import Store
from . import cache
from .client import ChatClient, host_of
from .prompt import PROMPT_VERSION, Context, build_messages, estimate_tokens, messages_json, parse_answer, top_genes

BACKBONE = "gpt-zero-shot"
PROTOCOL = "zero-shot"
DEFAULT_MODEL = "gpt-4o-mini"
READ_ROWS = 4096            # source rows read at a time when collecting top genes
FLUSH_EVERY = 64            # answers cached per transaction at most ...
FLUSH_SECONDS = 1.0         # ... and at least this often


@dataclass
class Batch:
    """One request: cells (indices into the selected cells) of one dataset and their prompt."""

    dataset: str
    cells: np.ndarray
    messages: list
    prompt: str
    key: str


def run_zero_shot(store: Store, where: str | None = None, datasets=None, model: str = DEFAULT_MODEL,
                  base_url: str | None = None, api_key: str | None = None, top_n: int = 10,
                  cells_per_request: int = 10, seed: int = 0, positive: str = "resistant", concurrency: int = 4,
                  max_cells: int = 500, confirm: Callable[[str], bool] | None = None, retries: int = 5,
                  retry_delay: float = 1.0, timeout: float = 120.0, show_progress: bool = True) -> ProbeRun:
    """Ask ``model`` for a response call on every cell selected by ``where``/``datasets``; stored.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``. When more
    than ``max_cells`` cells have no cached answer, ``confirm(message)`` decides whether to send
    them; without ``confirm`` that is an error. Returns the stored run.
    """
    _check_args(top_n, cells_per_request, concurrency, max_cells, retries, retry_delay, positive)
    store.require_writable("zero-shot (it caches answers and stores its run)")
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
    names = store.require_datasets(list(datasets or []))
    cells = store.cells(where, names if datasets else None).reset_index(drop=True)
    if cells.empty:
        raise UserError("no cells selected: check --dataset and --where")
    cells, _, unlabelled_notes = labelled_cells(cells, None)        # unlabelled cells are not sent
    batches = _batches(store, cells, model, top_n, cells_per_request, seed, show_progress)

    answers = cache.lookup(store, [b.key for b in batches])
    todo = {b.key: b for b in batches if b.key not in answers}       # identical prompts are sent once
    n_new_cells = sum(len(b.cells) for b in batches if b.key not in answers)
    if n_new_cells > max_cells:
        tokens = estimate_tokens(sum(len(b.prompt) for b in todo.values()), len(todo), n_new_cells)
        what = (f"{n_new_cells:,} cells ({len(todo):,} requests, about {tokens:,} tokens) have no cached answer, "
                f"more than --max-cells {max_cells:,}")
        if confirm is None:
            raise UserError(f"{what}: pass --yes to send them, or raise --max-cells")
        if not confirm(f"{what}; send them to {model} at {host_of(base_url)}?"):
            raise UserError("cancelled: nothing was sent")
    if todo:
        client = ChatClient(model, base_url=base_url, api_key=api_key, retries=retries, retry_delay=retry_delay,
                            timeout=timeout)
        answers.update(_send(store, client, todo, concurrency, show_progress))

    predictions = np.full(len(cells), -1, dtype=np.int64)            # -1: no valid answer
    bad_requests = 0
    for b in batches:
        parsed = parse_answer(answers[b.key], len(b.cells))
        if parsed is None:
            bad_requests += 1
        else:
            predictions[b.cells] = parsed
    records, notes = _score(cells, predictions, positive)
    notes[:0] = unlabelled_notes
    n_unanswered = int((predictions < 0).sum())
    if n_unanswered:
        notes.insert(0, f"{n_unanswered:,} of {len(cells):,} cells got no valid answer ({bad_requests:,} of "
                        f"{len(batches):,} responses without exactly one 0/1 per cell); they are not scored")
    n_cached = len(batches) - sum(1 for b in batches if b.key in todo)
    notes.append(f"{len(batches):,} requests: {len(todo):,} sent, {n_cached:,} answered from the cache")
    params = {"model": model, "base_url_host": host_of(base_url), "top_n": top_n,
              "cells_per_request": cells_per_request, "seed": seed, "temperature": 0,
              "prompt_version": PROMPT_VERSION, "n_requests": len(batches), "n_sent": len(todo),
              "n_cached": n_cached, "n_unanswered": n_unanswered}
    run = ProbeRun(uuid.uuid4().hex[:12], BACKBONE, model, PROTOCOL, "none", len(cells),
                   sorted(cells["dataset"].unique()), _results_frame(records), notes, method="zero-shot",
                   params=params)
    _save(store, run, _cohort_sql(where, list(datasets or [])), seed, positive)
    return run


def _check_args(top_n, cells_per_request, concurrency, max_cells, retries, retry_delay, positive) -> None:
    for name, value, low in (("--top-n", top_n, 1), ("--cells-per-request", cells_per_request, 1),
                             ("--concurrency", concurrency, 1), ("--max-cells", max_cells, 0),
                             ("--retries", retries, 0)):
        if int(value) != value or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    if retry_delay < 0:
        raise UserError(f"--retry-delay must be >= 0, got {retry_delay!r}")
    if positive not in ("resistant", "sensitive"):
        raise UserError(f"--positive must be resistant or sensitive, got {positive!r}")


def _batches(store: Store, cells, model: str, top_n: int, size: int, seed: int, show_progress: bool) -> list[Batch]:
    """Prompts of every batch, dataset by dataset, in each dataset's seeded cell order."""
    from ..extract.runner import DatasetSource

    info = store.datasets().set_index("dataset")
    batches = []
    for name, group in cells.groupby("dataset", sort=True):
        row = {k: (None if _isna(v) else v) for k, v in info.loc[name].to_dict().items()}
        row["dataset"] = name
        context = Context(name, row.get("drug"), row.get("cancer_type"), row.get("tissue"))
        rows = group["row"].to_numpy()
        keys = np.random.default_rng([seed, zlib.crc32(name.encode())]).random(int(row["n_cells"]))
        order = group.index.to_numpy()[np.argsort(keys[rows], kind="stable")]
        source = DatasetSource(row)                                   # checks the sha256 recorded at ingest
        try:
            genes = _gene_lists(source, rows, top_n, show_progress)
        finally:
            source.close()
        by_index = dict(zip(group.index.to_numpy(), (genes[r] for r in rows)))
        for lo in range(0, len(order), size):
            idx = order[lo:lo + size]
            messages = build_messages(context, [by_index[i] for i in idx], top_n)
            prompt = messages_json(messages)
            batches.append(Batch(name, idx, messages, prompt, cache.cache_key(model, prompt)))
    return batches


def _gene_lists(source, rows: np.ndarray, top_n: int, show_progress: bool) -> dict[int, list[str]]:
    """Top-``top_n`` gene symbols of each wanted source row, reading only blocks that hold some."""
    symbols = source.symbols(upper=False)
    wanted = np.unique(rows)
    out = {}
    with progress_bar(f"top genes · {source.name}", total=len(wanted), enabled=show_progress) as advance:
        for lo in range(0, source.n_cells, READ_ROWS):
            here = wanted[(wanted >= lo) & (wanted < lo + READ_ROWS)]
            if not len(here):
                continue
            first = int(here[0])
            block = source.rows(first, int(here[-1]) + 1)
            for r in here:
                out[int(r)] = top_genes(block, int(r) - first, symbols, top_n)
            advance(len(here))
    return out


def _send(store: Store, client: ChatClient, todo: dict, concurrency: int, show_progress: bool) -> dict[str, str]:
    """Answers of ``todo``'s prompts; each is cached soon after it arrives, even if the run then fails."""
    answers, unsaved = {}, []
    last_flush = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="zero-shot")
    futures = {pool.submit(client.complete, b.messages): b for b in todo.values()}
    try:
        with progress_bar(f"{client.model} · {len(todo)} requests", total=len(todo),
                          enabled=show_progress) as advance:
            for future in as_completed(futures):
                b = futures[future]
                answers[b.key] = future.result()                      # a UserError ends the run
                unsaved.append((b.key, client.model, b.prompt, answers[b.key]))
                advance(1)
                if len(unsaved) >= FLUSH_EVERY or time.monotonic() - last_flush >= FLUSH_SECONDS:
                    cache.save(store, unsaved)
                    unsaved, last_flush = [], time.monotonic()
    except BaseException:
        client.stop.set()                                             # no more retries or new requests
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # answers that arrived while the run was failing were paid for too: keep them
        for future, b in futures.items():
            if b.key not in answers and future.done() and not future.cancelled() and future.exception() is None:
                answers[b.key] = future.result()
                unsaved.append((b.key, client.model, b.prompt, answers[b.key]))
        cache.save(store, unsaved)
    return answers


def _score(cells, predictions: np.ndarray, positive: str) -> tuple[list[dict], list[str]]:
    """One probe-style record per dataset, scoring the cells with a valid answer."""
    labels = cells["label"].to_numpy()
    names = cells["dataset"].to_numpy()
    records, notes = [], []
    for name in sorted(set(names)):
        here = names == name
        answered = here & (predictions >= 0)
        n, k = int(here.sum()), int(answered.sum())
        truth = (labels[answered] == positive).astype(np.int64)
        said = np.where(predictions[answered] == 1, "sensitive", "resistant")
        record = {"split": name, "status": "ok", "reason": None, "n_train": 0, "n_test": k,
                  "n_test_pos": int(truth.sum()), "metrics": None, "fit_seconds": None}
        reasons = [f"{n - k:,} of {n:,} cells without a valid answer (not scored)"] if k < n else []
        if k == 0:
            record["status"] = "no-answer"
            notes.append(f"dataset {name}: no cell got a valid answer, so it has no scores")
        else:
            record["metrics"] = score(truth, (said == positive).astype(float), positive=1)
            if len(set(truth)) < 2:
                record["status"] = "one-class-test"
                reasons.append(f"answered cells are all {labels[answered][0]}; AUROC, AUPRC and MCC are undefined "
                               "(NaN)")
        record["reason"] = "; ".join(reasons) or None
        records.append(record)
    return records, notes


def _cohort_sql(where: str | None, datasets: list[str]) -> str | None:
    """The selection as one SQL condition on ``cohort``, as recorded in ``probe_runs.where_sql``."""
    parts = []
    if where:
        parts.append(f"({where})" if datasets else where)
    if datasets:
        parts.append("dataset IN (" + ", ".join("'" + d.replace("'", "''") + "'" for d in datasets) + ")")
    return " AND ".join(parts) or None


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))
