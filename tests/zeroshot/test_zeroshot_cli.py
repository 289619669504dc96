"""``scdrugmap zero-shot`` end to end on the real PC9 data against a fake OpenAI-compatible server:
prompts, batching, scoring, storage, leaderboard, cache, cost guard, retries and errors."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import copy_store, snapshot
from fake_openai import call, fake_server, gene_lists, good_answer  # noqa: F401  (fixture)
from scdrugmap.errors import UserError
from scdrugmap.store.store import Store
from scdrugmap.zeroshot import run_zero_shot

KEY = "sk-test-secret-0123456789"
WHERE = "row % 7 = 0"                       # 215 of PC9's 1,505 cells
N_SELECTED = 215


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    """PC9 ingested twice: as 'pc9' with its context, and as 'pc9b' with none."""
    from conftest import PC9, Cli, need_shared

    need_shared(PC9)
    st = tmp_path_factory.mktemp("zs") / "st"
    cli = Cli()
    cli.ok("ingest", PC9, "--store", st, "--dataset", "pc9", "--label-col", "response", "--sample-col", "sample_id",
           "--drug", "erlotinib", "--cancer-type", "Lung cancer", "--tissue", "Cell line", "--quiet")
    cli.ok("ingest", PC9, "--store", st, "--dataset", "pc9b", "--label-col", "response", "--quiet")
    return st


@pytest.fixture
def store(base_store, tmp_path):
    return copy_store(base_store, tmp_path)


@pytest.fixture(scope="module")
def pc9_matrix():
    import anndata as ad

    from conftest import PC9

    adata = ad.read_h5ad(PC9)
    return adata.X.tocsr(), np.asarray(adata.var_names), adata.obs["response"].to_numpy()


def hand_top10(X, symbols, row: int) -> list[str]:
    values = X[row].toarray().ravel()
    cols = sorted(np.flatnonzero(values > 0), key=lambda c: (-values[c], c))[:10]
    return [str(symbols[c]) for c in cols]


def zero_shot(cli, store, server, *args, ok=True, match=None):
    argv = ["zero-shot", "--store", store, "--base-url", server.url, "--api-key", KEY, "--retry-delay", "0.01",
            "--quiet", *args]
    return cli.ok(*argv) if ok else cli.fails(*argv, match=match)


def latest_run(store) -> tuple[dict, dict]:
    st = Store.open(store)
    run = st.sql("SELECT * FROM probe_runs ORDER BY created_at DESC LIMIT 1").iloc[0].to_dict()
    results = st.sql(f"SELECT * FROM probe_results WHERE run_id = '{run['run_id']}' ORDER BY split")
    return run, results


def test_end_to_end_prompts_scores_storage_and_leaderboard(cli, store, fake_server, pc9_matrix):
    result = zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", WHERE)
    X, symbols, labels = pc9_matrix
    rows = np.arange(0, X.shape[0], 7)

    # batching: ceil(215 / 10) requests of one dataset, the last one shorter (sent, not dropped)
    prompts = fake_server.prompts
    assert len(prompts) == math.ceil(N_SELECTED / 10) == 22
    assert sorted(len(gene_lists(p)) for p in prompts) == [5] + [10] * 21
    # each cell's top-10 genes as computed by hand from the h5ad, each cell exactly once
    expected = {r: hand_top10(X, symbols, r) for r in rows}
    received = [tuple(g) for p in prompts for g in gene_lists(p)]
    assert Counter(received) == Counter(tuple(g) for g in expected.values())
    assert tuple(expected[0]) in received and len(expected[0]) == 10
    for p in prompts:
        assert "Dataset: pc9\nDrug: erlotinib\nCancer type: Lung cancer\nTissue: Cell line" in p
        assert "control" not in p                                  # obs names never sent
    # shuffled before batching: batches are not runs of consecutive rows, and some mix the labels
    row_of = {tuple(g): r for r, g in expected.items()}
    batch_rows = [[row_of[tuple(g)] for g in gene_lists(p)] for p in prompts]
    assert any(b != sorted(b) for b in batch_rows)
    assert any(len({labels[r] for r in b}) == 2 for b in batch_rows)

    # scored with 1 = sensitive, positive class resistant, as the fake model answered
    said = np.array(["sensitive" if call(g) else "resistant" for g in expected.values()])
    truth = labels[rows]
    run, results = latest_run(store)
    assert (run["backbone"], run["head"], run["method"], run["protocol"]) == \
        ("gpt-zero-shot", "gpt-4o-mini", "zero-shot", "zero-shot")
    assert run["where_sql"] == f"({WHERE}) AND dataset IN ('pc9')" and list(run["datasets"]) == ["pc9"]
    params = json.loads(run["params"])
    assert params == {**params, "model": "gpt-4o-mini", "base_url_host": fake_server.host, "top_n": 10,
                      "cells_per_request": 10, "seed": 0, "n_requests": 22, "n_cached": 0, "n_sent": 22,
                      "n_unanswered": 0, "temperature": 0}
    [res] = results.to_dict("records")
    assert (res["split"], res["status"], res["n_train"], res["n_test"]) == ("pc9", "ok", 0, N_SELECTED)
    assert res["n_test_positive"] == int((truth == "resistant").sum())
    assert res["accuracy"] == pytest.approx(float((said == truth).mean()))
    tp = int(((said == "resistant") & (truth == "resistant")).sum())
    assert res["precision"] == pytest.approx(tp / int((said == "resistant").sum()))
    assert res["auroc"] == pytest.approx(res["balanced_accuracy"])       # hard 0/1 answers
    assert "pc9" in result.output and "22 requests: 22 sent, 0 answered from the cache" in result.stderr

    # the key is nowhere in the store
    assert all(KEY.encode() not in p.read_bytes() for p in store.rglob("*") if p.is_file())
    wide = {"COLUMNS": "250"}                                     # no truncated cells in the table
    board = cli.ok("leaderboard", "--store", store, "--protocol", "zero-shot", env=wide).output
    assert "gpt-zero-shot" in board and "zero-shot" in board and "gpt-4o-mini" in board
    assert "gpt-zero-shot" in cli.ok("leaderboard", "--store", store, env=wide).output


def test_rerun_is_answered_from_the_cache(cli, store, fake_server, monkeypatch):
    zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", WHERE)
    first, first_results = latest_run(store)
    sent = len(fake_server.requests)
    # same command: nothing sent, even without the openai package, identical results
    monkeypatch.setitem(sys.modules, "openai", None)
    out = zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", WHERE)
    assert len(fake_server.requests) == sent and "0 sent, 22 answered from the cache" in out.stderr
    second, second_results = latest_run(store)
    assert second["run_id"] != first["run_id"]
    assert json.loads(second["params"])["n_cached"] == 22 and json.loads(second["params"])["n_sent"] == 0
    cols = ["split", "status", "n_test", "f1", "auroc", "accuracy", "mcc"]
    assert first_results[cols].equals(second_results[cols])
    cache = Store.open(store).sql("SELECT model, prompt, response FROM zero_shot_cache")
    assert len(cache) == 22 and set(cache["model"]) == {"gpt-4o-mini"}
    assert json.loads(cache["prompt"][0])[0]["role"] == "user"


def test_datasets_are_batched_separately(cli, store, fake_server):
    zero_shot(cli, store, fake_server, "--where", "row < 15")
    prompts = fake_server.prompts
    assert len(prompts) == 4                                     # 2 + 2, not ceil(30 / 10) = 3
    assert Counter(p.count("\nCell ") for p in prompts) == Counter({10: 2, 5: 2})
    assert sum("Dataset: pc9b\n" in p for p in prompts) == 2
    assert not any("Drug:" in p for p in prompts if "Dataset: pc9b\n" in p)   # unknown context not said
    _, results = latest_run(store)
    assert list(results["split"]) == ["pc9", "pc9b"] and list(results["n_test"]) == [15, 15]


def test_transient_errors_are_retried(cli, store, fake_server):
    fake_server.fail = [429, 429]
    zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", "row < 10", "--concurrency", "1")
    assert len(fake_server.requests) == 3
    _, results = latest_run(store)
    assert results["n_test"].tolist() == [10]


def test_cost_guard(cli, store, fake_server):
    before = snapshot(store)
    err = zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", WHERE, "--max-cells", "100", ok=False,
                    match="--yes")
    assert "215 cells (22 requests, about" in err and "tokens" in err and "--max-cells" in err
    assert snapshot(store) == before and not fake_server.requests
    zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", WHERE, "--max-cells", "100", "--yes")
    assert len(fake_server.requests) == 22
    # cached cells do not count: the same selection now passes the guard without --yes
    zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", WHERE, "--max-cells", "0")
    assert len(fake_server.requests) == 22


def test_python_api_confirm(store, fake_server):
    asked = []
    st = Store.open(store)
    kw = dict(where="row < 25", datasets=["pc9"], base_url=fake_server.url, api_key=KEY, max_cells=20,
              show_progress=False)
    with pytest.raises(UserError, match="cancelled: nothing was sent"):
        run_zero_shot(st, confirm=lambda message: asked.append(message) or False, **kw)
    assert "25 cells (3 requests" in asked[0] and fake_server.host in asked[0] and not fake_server.requests
    run = run_zero_shot(st, confirm=lambda message: True, **kw)
    assert len(fake_server.requests) == 3 and run.protocol == "zero-shot" and run.params["n_requests"] == 3
    assert list(run.results["n_train"]) == [0]


def test_invalid_answers_are_counted_not_scored(cli, store, fake_server):
    def kind(lists):                                            # deterministic per prompt: 0, 1 bad; 2, 3 good
        return call(lists[0] + ["x"]) + 2 * call(lists[-1] + ["y"])

    def answer(lists):
        if kind(lists) == 0:
            return "These genes suggest a mixed population."
        if kind(lists) == 1:
            return "{res:" + ",".join(["1"] * (len(lists) + 1)) + "}"      # one too many
        return "Sure. " + good_answer(lists)

    fake_server.answer = answer
    out = zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", WHERE)
    bad = [gene_lists(p) for p in fake_server.prompts if kind(gene_lists(p)) < 2]
    unanswered = sum(len(lists) for lists in bad)
    assert 0 < unanswered < N_SELECTED
    run, results = latest_run(store)
    assert json.loads(run["params"])["n_unanswered"] == unanswered
    [res] = results.to_dict("records")
    assert res["status"] == "ok" and res["n_test"] == N_SELECTED - unanswered
    assert res["reason"] == f"{unanswered} of {N_SELECTED} cells without a valid answer (not scored)"
    note = f"{unanswered} of {N_SELECTED} cells got no valid answer ({len(bad)} of 22 responses"
    assert note in out.stderr and note in run["note"]


def test_no_valid_answer_at_all(cli, store, fake_server):
    fake_server.answer = lambda lists: "I cannot tell."
    out = zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", "row < 30")
    _, results = latest_run(store)
    [res] = results.to_dict("records")
    assert res["status"] == "no-answer" and res["n_test"] == 0 and math.isnan(res["f1"])
    assert "no cell got a valid answer" in out.stderr


@pytest.mark.parametrize("setup, extra, match", [
    (lambda s: setattr(s, "status", 401), [], "refused the API key"),
    (lambda s: s.fail.extend([503] * 100), ["--retries", "2"], "answered 503 after 3 tries"),
])
def test_server_errors_leave_the_store_unchanged(cli, store, fake_server, setup, extra, match):
    setup(fake_server)
    before = snapshot(store)
    err = zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", "row < 40", *extra, ok=False,
                    match=match)
    assert KEY not in err and snapshot(store) == before


def test_failed_run_keeps_the_answers_it_paid_for(cli, store, fake_server):
    fake_server.fail = [0] + [401] * 10                         # first request answered, then a refused key
    zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", "row < 30", "--concurrency", "1", ok=False,
              match="refused the API key")
    st = Store.open(store)
    assert len(st.sql("SELECT * FROM zero_shot_cache")) == 1 and st.sql("SELECT * FROM probe_runs").empty
    fake_server.requests.clear()
    fake_server.fail.clear()
    zero_shot(cli, store, fake_server, "--dataset", "pc9", "--where", "row < 30")
    assert len(fake_server.requests) == 2                       # 3 batches, one already paid for
    assert json.loads(latest_run(store)[0]["params"])["n_cached"] == 1


def test_store_made_before_the_cache_table(store, fake_server):
    import duckdb

    with duckdb.connect(str(store / "index.duckdb")) as con:
        con.execute("DROP TABLE zero_shot_cache")
    run_zero_shot(Store.open(store), where="row < 10", datasets=["pc9"], base_url=fake_server.url, api_key=KEY,
                  show_progress=False)
    assert len(Store.open(store).sql("SELECT * FROM zero_shot_cache")) == 1


def test_unreachable_server_and_missing_package(cli, store, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = snapshot(store)
    cli.fails("zero-shot", "--store", store, "--base-url", f"http://127.0.0.1:{port}/v1", "--api-key", KEY,
              "--where", "row < 10", "--retries", "1", "--retry-delay", "0.01", "--quiet", match="cannot reach")
    monkeypatch.setitem(sys.modules, "openai", None)
    cli.fails("zero-shot", "--store", store, "--api-key", KEY, "--where", "row < 10", "--quiet",
              match="pip install 'scdrugmap[zeroshot]'")
    assert snapshot(store) == before


@pytest.mark.parametrize("args, match", [
    (["--dataset", "nope"], "unknown dataset"),
    (["--where", "dataset = 'nope'"], "matches no cells"),
    (["--where", "no_column = 1"], "invalid --where"),
])
def test_bad_input(cli, store, fake_server, args, match):
    before = snapshot(store)
    zero_shot(cli, store, fake_server, *args, ok=False, match=match)
    assert snapshot(store) == before and not fake_server.requests


def test_help_has_examples(cli):
    out = cli.ok("zero-shot", "--help").output
    assert "Examples:" in out and "--base-url" in out and "OPENAI_API_KEY" in out


def test_unlabelled_cells_are_not_sent_nor_scored(cli, store, fake_server):
    from conftest import PC9

    cli.ok("ingest", PC9, "--store", store, "--dataset", "nolabel", "--quiet")
    zero_shot(cli, store, fake_server, "--where", "row < 15")
    assert not any("Dataset: nolabel\n" in p for p in fake_server.prompts)
    run, results = latest_run(store)
    assert list(results["split"]) == ["pc9", "pc9b"] and run["n_cells"] == 30
    assert "15 unlabelled cells of the selection were left out" in run["note"]
    before = snapshot(store)
    n_sent = len(fake_server.requests)
    zero_shot(cli, store, fake_server, "--dataset", "nolabel", ok=False, match="no sensitive/resistant label")
    assert snapshot(store) == before and len(fake_server.requests) == n_sent
