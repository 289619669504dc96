"""The routes of ``scdrugmap serve`` (Starlette). Pages read the store; with ``allow_writes``
they also upload, extract, predict and train, in the background (:mod:`.jobs`).

Safety: every read goes through the store's read-only connections (:mod:`scdrugmap.store.sql`:
one SELECT, no file access); names from a request are checked against the patterns the store
uses (never a path); writes are refused unless the server was started with --allow-writes, and
a form posted from another site (Origin of another host) is refused.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import UserError
from ..store.schema import METRIC_COLUMNS, check_metric
from ..store.store import Store
from . import data
from .jobs import Jobs

HERE = Path(__file__).resolve().parent
RUN_ID_RE = re.compile(r"^[0-9a-f]{6,64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:-]{0,99}$")        # datasets and models
JOB_ID_RE = re.compile(r"^[0-9a-f]{16}$")
WHERE_MAX = 2000


@dataclass
class Settings:
    store_path: Path
    allow_writes: bool = False
    max_upload_bytes: int = 2 * 10**9
    upload_dir: Path | None = None
    hosts: tuple = ("127.0.0.1", "localhost")

    @property
    def uploads(self) -> Path:
        return self.upload_dir or self.store_path.parent / f"{self.store_path.name}.uploads"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(settings: Settings) -> Starlette:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    jobs = Jobs()

    def store() -> Store:
        return Store.open(settings.store_path)

    def page(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        context.update(allow_writes=settings.allow_writes, store_location=str(settings.store_path))
        return templates.TemplateResponse(request, template, context, status_code=status)

    def refusal(request: Request, status: int, message: str) -> HTMLResponse:
        return page(request, "error.html", status=status, message=message)

    def checked(value: str | None, pattern: re.Pattern, what: str) -> str:
        if value is None or not pattern.match(value):
            raise Refused(400, f"invalid {what} {value!r}: only names as the store writes them are accepted "
                               "(letters, digits, . _ -), never a path")
        return value

    def require_writes(request: Request) -> None:
        if not settings.allow_writes:
            raise Refused(403, "this server is read-only: restart it with 'scdrugmap serve --allow-writes' to upload, "
                               "predict or train")
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = re.sub(r"^[a-z]+://", "", origin).rstrip("/")
            if host != request.headers.get("host"):
                raise Refused(403, f"a form posted from {origin} is refused: use the app's own pages")

    # ---- read-only pages -------------------------------------------------------------------
    def index(request: Request):
        frame = data.datasets(store())
        return page(request, "index.html", datasets=data.table(frame))

    def dataset(request: Request):
        name = checked(request.path_params["name"], NAME_RE, "dataset name")
        st = store()
        rows = st.datasets().set_index("dataset")
        if name not in rows.index:
            raise Refused(404, f"unknown dataset {name!r}: see the list of datasets")
        counts = data.dataset_counts(st, name)
        row = rows.loc[name]
        return page(request, "dataset.html", name=name, row={k: data.cell_text(v) for k, v in row.items()},
                    counts={k: data.table(v) for k, v in counts.items()},
                    models=data.model_names(st) if settings.allow_writes else [])

    def sql(request: Request):
        query = request.query_params.get("q", "")
        result, error, total = None, None, 0
        if query.strip():
            try:
                frame = store().sql(query)
                total = len(frame)
                result = data.table(frame.head(data.MAX_SQL_ROWS), "{:.4g}")
            except UserError as e:
                error = " ".join(str(e).split())
        return page(request, "sql.html", query=query or "SELECT dataset, label, count(*) AS cells FROM cohort "
                                                       "GROUP BY ALL ORDER BY ALL",
                    result=result, error=error, total=total, shown=min(total, data.MAX_SQL_ROWS),
                    status=400 if error else 200)

    def sql_csv(request: Request):
        frame = store().sql(request.query_params.get("q", ""))    # a UserError is the 400 page (user_error)
        return csv_response(frame, "query.csv")

    def leaderboard(request: Request):
        from ..probe.leaderboard import LEADERBOARD_PROTOCOLS, leaderboard_sections

        q = request.query_params
        metric = q.get("metric", "f1")
        protocol = q.get("protocol") or None
        head = q.get("head") or None
        try:
            bootstrap = int(q.get("bootstrap", "200"))
        except ValueError:
            raise Refused(400, "bootstrap must be a whole number of replicates (0 for none)") from None
        check_metric(metric)                      # a UserError: the 400 page
        if not 0 <= bootstrap <= 5000:
            raise Refused(400, "bootstrap must be between 0 and 5000 replicates")
        st = store()
        sections, error = [], None
        try:
            frame = data.leaderboard(st, metric, protocol, head, bootstrap)
            for heading, part in leaderboard_sections(frame):
                sections.append({"title": heading, "table": data.table(part), "run_ids": list(part["run_id"])})
        except UserError as e:
            error = " ".join(str(e).split())
        return page(request, "leaderboard.html", sections=sections, error=error, metric=metric,
                    metrics=METRIC_COLUMNS, protocol=protocol or "", protocols=LEADERBOARD_PROTOCOLS,
                    head=head or "", heads=data.heads(st), bootstrap=bootstrap)

    def run(request: Request):
        run_id = checked(request.path_params["run_id"], RUN_ID_RE, "run id")
        metric = check_metric(request.query_params.get("metric", "f1"))
        info = data.run_page(store(), run_id, metric)
        if info is None:
            raise Refused(404, f"no run {run_id!r}: run ids are in the leaderboard")
        return page(request, "run.html", run_id=run_id, settings=info["settings"],
                    results=data.table(info["results"]), figures=info["figures"])

    def predictions_csv(request: Request):
        model = checked(request.query_params.get("model"), NAME_RE, "model name")
        name = checked(request.query_params.get("dataset"), NAME_RE, "dataset name")
        frame = data.predictions(store(), model, name)
        if frame.empty:
            raise Refused(404, f"no predictions of model {model!r} for dataset {name!r}")
        return csv_response(frame, f"predictions-{model}-{name}.csv")

    # ---- writes: upload + extract + predict, train --------------------------------------------
    def upload_form(request: Request):
        st = store()
        return page(request, "upload.html", models=data.model_names(st), max_mb=settings.max_upload_bytes / 1e6)

    async def upload(request: Request):
        from ..store.ingest import IngestRequest
        from .uploads import TooLarge, register, save_stream, upload_format

        require_writes(request)
        length = request.headers.get("content-length")
        if length is None:
            raise Refused(411, "an upload must say its size (Content-Length)")
        if not length.isdigit() or int(length) > settings.max_upload_bytes + 1_000_000:
            raise Refused(413, f"the upload is larger than the server's limit of "
                               f"{settings.max_upload_bytes / 1e6:,.0f} MB: start the server with a larger "
                               "--max-upload-mb")
        try:
            form = await request.form(max_files=1, max_fields=30)
        except ClientDisconnect:
            return Response(status_code=400)
        models = await run_in_threadpool(lambda: data.model_names(store()))
        values = {k: str(v) for k, v in form.items() if isinstance(v, str)}

        def again(message: str, status: int = 400):
            return page(request, "upload.html", status=status, models=models, error=message, form=values,
                        max_mb=settings.max_upload_bytes / 1e6)

        upload_file = form.get("file")
        if upload_file is None or isinstance(upload_file, str) or not upload_file.filename:
            return again("choose a file to upload")
        model = values.get("model") or None
        if model is not None and model not in models:
            return again(f"unknown model {model!r}: choose one of the list")

        def listed(key):
            return tuple(v.strip() for v in values.get(key, "").split(",") if v.strip())

        try:
            fmt = upload_format(upload_file.filename)
            part, sha = await save_stream(upload_file, settings.uploads, settings.max_upload_bytes)
            req = IngestRequest(file=part, dataset=values.get("dataset", "").strip(),
                                label_col=values.get("label_col", "").strip() or "condition",
                                sensitive=listed("sensitive"), resistant=listed("resistant"),
                                sample_col=values.get("sample_col", "").strip() or None,
                                patient_col=values.get("patient_col", "").strip() or None,
                                context={"drug": values.get("drug", "").strip() or None})
            report = await run_in_threadpool(register, settings.store_path, part, sha, fmt, settings.uploads, req)
        except TooLarge as e:
            return again(" ".join(str(e).split()), 413)
        except UserError as e:
            return again(" ".join(str(e).split()))
        finally:
            await upload_file.close()
        job = start_extract_predict(report.dataset, model,
                                    f"{report.n_cells:,} cells of {report.dataset} ingested")
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    def start_extract_predict(name: str, model: str | None, first: str):
        def work(progress):
            from ..extract.runner import extract
            from ..inference import predict
            from ..inference.models import model_row

            progress(1, first)
            st = store()
            have = st.extracted_backbones()
            backbones = [b for b in data.BASELINES if b in have] or ["pca"]
            if model is not None:
                backbone = model_row(st, model)["backbone"]
                if backbone not in data.BASELINES:
                    raise UserError(f"model {model!r} needs {backbone} embeddings, which need the backbone's weights: "
                                    f"run 'scdrugmap extract --backbone {backbone} --dataset {name} --model-dir ...' "
                                    "and predict from the Datasets page")
                backbones = sorted(set(backbones) | {backbone})
            progress.steps(1 + len(backbones) + (model is not None))     # ingested, each extraction, predict
            done = []
            for k, backbone in enumerate(backbones):
                progress(1 + k, f"extracting {backbone} embeddings of {name}")
                for r in extract(st, backbone, datasets=[name], show_progress=False):
                    done.append(f"{backbone}: {r.n_cells:,} cells x {r.dim}" if r.status != "skipped"
                                else f"{backbone}: already extracted")
            result = {"dataset": name, "extracted": done}
            if model is not None:
                progress(1 + len(backbones), f"predicting {name} with {model}")
                result.update(prediction_result(predict(st, model, name, show_progress=False), model, name))
            return result

        total = 2 + len(data.BASELINES) + (model is not None)
        return jobs.submit("upload", f"extract{' and predict' if model else ''}: {name}", total, work)

    def prediction_result(pred, model: str, name: str) -> dict:
        summary = pred.summary.rename(columns={"group": "name"})
        cells = pred.cells.drop(columns=["dataset"]).head(200)
        return {"model": model, "summary": data.table(summary), "cells": data.table(cells),
                "n_cells": len(pred.cells), "n_resistant": int((pred.cells["call"] == "resistant").sum()),
                "notes": pred.notes, "seconds": round(pred.seconds["total"], 2),
                "csv": "/predictions.csv?" + urlencode({"model": model, "dataset": name})}

    async def predict_existing(request: Request):
        require_writes(request)
        form = await request.form(max_files=0, max_fields=10)
        name = checked(form.get("dataset"), NAME_RE, "dataset name")
        model = checked(form.get("model"), NAME_RE, "model name")

        def check():
            st = store()
            if name not in st.dataset_names():
                raise Refused(404, f"unknown dataset {name!r}")
            if model not in data.model_names(st):
                raise Refused(404, f"unknown model {model!r}")

        await run_in_threadpool(check)
        job = start_extract_predict(name, model, f"dataset {name}")
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    def train_form(request: Request):
        from ..probe.heads import head_names
        from ..probe.run import PROTOCOLS
        from ..probe.splits import GROUP_BY_CHOICES

        st = store()
        return page(request, "train.html", backbones=st.extracted_backbones(), heads=head_names(),
                    protocols=PROTOCOLS, groupings=GROUP_BY_CHOICES)

    async def train(request: Request):
        from ..probe.heads import head_names
        from ..probe.run import PROTOCOLS, run_probe
        from ..probe.splits import GROUP_BY_CHOICES
        from ..store.sql import check_condition

        require_writes(request)
        form = await request.form(max_files=0, max_fields=10)
        backbones = await run_in_threadpool(lambda: store().extracted_backbones())
        backbone, head = form.get("backbone", ""), form.get("head", "")
        protocol, group_by = form.get("protocol", "pooled"), form.get("group_by", "auto")
        where = (form.get("where") or "").strip() or None
        if backbone not in backbones:
            raise Refused(400, f"backbone {backbone!r} has no embeddings in this store")
        if head not in head_names() or protocol not in PROTOCOLS or group_by not in GROUP_BY_CHOICES:
            raise Refused(400, "choose a head, protocol and grouping of the lists")
        if where is not None:
            if len(where) > WHERE_MAX:
                raise Refused(400, "the cohort condition is too long")
            await run_in_threadpool(check_condition, where, "cohort", "cohort")

        def work(progress):
            progress(1, f"probing {backbone} · {head} ({protocol}, grouped by {group_by})")
            r = run_probe(store(), backbone, head=head, protocol=protocol, group_by=group_by, where=where,
                          show_progress=False)
            return {"run_id": r.run_id, "summary": {k: data.cell_text(v) for k, v in r.summary_row().items()},
                    "notes": list(r.notes)}

        job = jobs.submit("train", f"probe {backbone} · {head} · {protocol}", 2, work)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    def job_page(request: Request):
        job = jobs.get(checked(request.path_params["job_id"], JOB_ID_RE, "job id"))
        if job is None:
            raise Refused(404, "no such job (jobs are kept while the server runs)")
        return page(request, "job.html", job=job)

    def job_status(request: Request):
        job = jobs.get(checked(request.path_params["job_id"], JOB_ID_RE, "job id"))
        if job is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return JSONResponse(job.status())

    async def refused(request: Request, exc: Refused):
        return refusal(request, exc.status, exc.message)

    async def user_error(request: Request, exc: UserError):
        return refusal(request, 400, " ".join(str(exc).split()))

    async def not_found(request: Request, exc):
        return refusal(request, 404, "no such page")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.shutdown()

    routes = [
        Route("/", index), Route("/datasets/{name}", dataset), Route("/sql", sql), Route("/sql.csv", sql_csv),
        Route("/leaderboard", leaderboard), Route("/runs/{run_id}", run),
        Route("/predictions.csv", predictions_csv),
        Route("/upload", upload_form, methods=["GET"]), Route("/upload", upload, methods=["POST"]),
        Route("/predict", predict_existing, methods=["POST"]),
        Route("/train", train_form, methods=["GET"]), Route("/train", train, methods=["POST"]),
        Route("/jobs/{job_id}.json", job_status), Route("/jobs/{job_id}", job_page),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={Refused: refused, UserError: user_error, 404: not_found},
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(settings.hosts))],
                    lifespan=lifespan)
    return app


def csv_response(frame, filename: str) -> Response:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return Response(buf.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})
