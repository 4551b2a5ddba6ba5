"""The web demo that `odlora serve` adds to OpenAI's routes: a page to chat with the base and its
adapters side by side, and personalisation jobs that add adapters to the running server.

    odlora serve --export exports/onnx --adapter dates=dates.onnx_adapter    # open http://127.0.0.1:8000/

    GET  /                  the page (apps/web, installed as `ondevice_lora.web`); /app/NAME its other files
    GET  /odlora/state      the export, each served adapter (rank, packed size, held-out metrics), the
                            shipped sample tasks and the job in progress
    POST /odlora/jobs       start a personalisation: {"name", "steps", "rank", "eval_examples", and one of
                            "sample": TASK | "path": FILE | "upload": {"filename", "text"}}; 202 with the job
    GET  /odlora/jobs/ID    its progress: state, step/total, loss and validation-loss curves, tokens/s, result
    POST /odlora/jobs/ID/cancel     stop it at its next step (nothing is written)
    DELETE /odlora/adapters/ID      stop serving an adapter; one a job of this page trained is also
                                    deleted from the work directory (one given to `serve` stays on disk)

The page chats through `/v1/chat/completions`, naming `base`, an adapter or a blend as `model`.
A job runs `personalize` (the training loop of `odlora personalize`) in a thread, packs the adapter
for the served export and registers it with the Runtime under its name, so that it is a model of
the next request. When the data is a shipped sample's train split, it also scores exact match on
that task's test split, base and adapter. One job runs at a time (another is a 409).

Data comes from the server's own disk: a shipped sample, a `.txt` / `.jsonl` / `.json` / `.csv` file (a regular file,
read, never run) or the text of an uploaded file, saved under the work directory. The server's
`access.Guard` has checked every request's Host, Origin and API key before these routes see it; a
job must also be sent as JSON, which a plain HTML form cannot do.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field as dataclass_field
from importlib import resources
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..adapter_store import remove_adapter
from ..config import MIN_DEFAULT_STEPS, LoraConfig, PersonalizeConfig, TrainConfig, default_of
from ..demo import task_answers
from ..errors import OdloraError
from ..exporters.export import pack
from ..formats.adapter_ids import RULE as ADAPTER_ID_RULE, is_adapter_id
from ..formats.targets import target
from ..outputs import PACKED
from ..personalization import personalize
from ..samples import SAMPLE_TASKS, exact_match, load_examples, sample_path
from ..runtime.engine import Runtime
from ..runtime.openai_schema import APIError, Schema, parse_body
from ..runtime.server import FiniteJSONResponse, read_body

WEB_PACKAGE = "ondevice_lora.web"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page loads nothing from elsewhere, and the browser holds it to that.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")  # what data.py reads that a text upload can carry
MAX_DATA_BYTES = 64 * 2**20
MAX_STEPS = 2000
MAX_EVAL_EXAMPLES = 100
FINISHED = ("done", "failed", "cancelled")


# -- the page ----------------------------------------------------------------------------------------

def static_file(route: str) -> Optional[tuple[bytes, str]]:
    """(content, type) of the page's file that `route` names; None when it names none.
    Only files listed in the web package are served: a route cannot reach anything else."""
    if route in ("", "/app"):
        name = "index.html"
    elif route.startswith("/app/"):
        name = route[len("/app/"):]
    else:
        return None
    files = {f.name: f for f in resources.files(WEB_PACKAGE).iterdir() if Path(f.name).suffix in CONTENT_TYPES}
    if name not in files:
        return None
    return files[name].read_bytes(), CONTENT_TYPES[Path(name).suffix]


def check_json(request: Request) -> None:
    """A job must come as JSON: a body type that a page of another site cannot send without the
    browser asking this server first (a form can send text/plain unasked)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise APIError(415, "send the job as Content-Type: application/json", code="unsupported_media_type")


# -- a job -------------------------------------------------------------------------------------------

class Upload(Schema):
    filename: str
    text: str


class JobRequest(Schema):
    """A job request's body; its data is exactly one of `sample`, `path` or `upload` (see `read_job`)."""

    name: str
    steps: int = Field(MIN_DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    rank: Optional[int] = None  # default: LoraConfig's, or the export's slot rank when smaller
    eval_examples: int = Field(20, ge=0, le=MAX_EVAL_EXAMPLES)
    sample: Optional[str] = None
    path: Optional[str] = None
    upload: Optional[Upload] = None

    @field_validator("name")
    @classmethod
    def adapter_id(cls, name: str) -> str:
        if not is_adapter_id(name):
            raise PydanticCustomError("invalid_value", ADAPTER_ID_RULE)
        return name


@dataclass
class JobSpec:
    """A checked job request."""

    name: str
    data: Optional[Path]  # None until an upload is saved
    steps: int
    rank: int
    eval_examples: int
    task: Optional[str]  # the shipped sample task the data is, scored by exact match
    upload: Optional[tuple[str, str]] = None  # (suffix, text) to save as the data


@dataclass
class Job:
    """One personalisation, as the page sees it; written by the job's thread, read by requests."""

    id: str
    spec: JobSpec
    state: str = "training"  # training -> packing -> scoring (a sample task) -> done | failed | cancelled
    step: int = 0
    loss: list = dataclass_field(default_factory=list)  # [step, training loss] per step
    val: list = dataclass_field(default_factory=list)  # [step, validation loss] per evaluation
    tokens_per_s: float = 0.0
    messages: list = dataclass_field(default_factory=list)
    adapter: Optional[dict] = None  # the new adapter's facts, once done
    error: Optional[str] = None
    started: float = dataclass_field(default_factory=time.time)
    seconds: Optional[float] = None
    cancel_asked: bool = False
    _lock: threading.Lock = dataclass_field(default_factory=threading.Lock, repr=False)

    def record(self, record: dict) -> None:
        """A training step or a validation, from `personalize`; raises JobCancelled once asked to."""
        if self.cancel_asked:
            raise JobCancelled
        with self._lock:
            if record["event"] == "step":
                self.step, self.tokens_per_s = record["step"], record["tokens_per_s"]
                self.loss.append([record["step"], record["loss"]])
            elif record["event"] == "eval":
                self.val.append([record["step"], record["loss"]])

    def say(self, message: str) -> None:
        with self._lock:
            self.messages.append(message)

    def move_to(self, state: str, adapter: Optional[dict] = None, error: Optional[str] = None) -> None:
        with self._lock:
            self.state, self.adapter, self.error = state, adapter, error
            if state in FINISHED:
                self.seconds = time.time() - self.started

    def to_dict(self) -> dict:
        with self._lock:
            return {"id": self.id, "name": self.spec.name, "state": self.state, "step": self.step,
                    "total": self.spec.steps, "loss": list(self.loss), "val": list(self.val),
                    "tokens_per_s": self.tokens_per_s, "task": self.spec.task, "data": str(self.spec.data),
                    "messages": list(self.messages), "adapter": self.adapter, "error": self.error,
                    "seconds": self.seconds if self.seconds is not None else time.time() - self.started}


class JobCancelled(Exception):
    """Raised into a job's training at its next step once the page asks to cancel it."""


def read_job(body: JobRequest, rt: Runtime) -> JobSpec:
    """The job a request asks for, checked against this export and this machine (a 400 naming the
    field otherwise; `JobRequest` has checked the types and fixed ranges)."""
    max_rank = rt.manifest["slots"]["max_rank"]
    rank = min(default_of(LoraConfig, "rank"), max_rank) if body.rank is None else body.rank
    if not 1 <= rank <= max_rank:
        raise APIError(400, f"'rank' must be from 1 to {max_rank} (the export's adapter slots), got {rank}",
                       param="rank", code="invalid_value")
    sources = [key for key in ("sample", "path", "upload") if getattr(body, key) is not None]
    if len(sources) != 1:
        raise APIError(400, "give the data as exactly one of 'sample', 'path' or 'upload'", param="path",
                       code="invalid_value")
    spec = JobSpec(body.name, None, body.steps, rank, body.eval_examples, None)
    if body.upload is not None:
        spec.upload = read_upload(body.upload)
        return spec
    if body.sample is not None:
        if body.sample not in SAMPLE_TASKS:
            raise APIError(400, f"'sample' {body.sample!r} is not one of {', '.join(SAMPLE_TASKS)}", param="sample",
                           code="invalid_value")
        spec.data = sample_path(body.sample, "train")
    else:
        spec.data = data_file(body.path)
    spec.task = next((t for t in SAMPLE_TASKS if sample_path(t, "train").resolve() == spec.data), None)
    return spec


def data_file(path: str) -> Path:
    """A training file on this machine: a regular data file (DATA_SUFFIXES) of sane size (never a
    directory, device or pipe)."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop, no such user for ~
        raise APIError(400, f"'path' {path!r}: {e}", param="path", code="invalid_value") from None
    if resolved.suffix not in DATA_SUFFIXES:
        raise APIError(400, f"'path' {path!r}: the data must be a {' or '.join(DATA_SUFFIXES)} file", param="path",
                       code="invalid_value")
    if not resolved.is_file():
        raise APIError(400, f"'path' {path!r} is not a file on the server", param="path", code="invalid_value")
    if resolved.stat().st_size > MAX_DATA_BYTES:
        raise APIError(400, f"'path' {path!r} is over {MAX_DATA_BYTES // 2**20} MiB", param="path",
                       code="invalid_value")
    return resolved


def read_upload(upload: Upload) -> tuple[str, str]:
    filename, text = upload.filename, upload.text
    suffix = Path(filename).suffix
    if suffix not in DATA_SUFFIXES:
        raise APIError(400, f"'upload' {filename!r}: the data must be a {' or '.join(DATA_SUFFIXES)} file",
                       param="upload", code="invalid_value")
    if not text.strip():
        raise APIError(400, f"'upload' {filename!r} is empty", param="upload", code="invalid_value")
    return suffix, text


# -- the app -----------------------------------------------------------------------------------------

class WebApp:
    """The page's routes and its jobs, over the server's Runtime; jobs write under `work_dir`."""

    def __init__(self, rt: Runtime, work_dir):
        self.rt, self.work_dir = rt, Path(work_dir)
        self.jobs: dict[str, Job] = {}
        self.current: Optional[Job] = None
        self.scores: dict[str, dict] = {}  # adapter id -> exact match on its sample task
        self._lock = threading.Lock()
        self.reloaded = self.reload_adapters()

    def reload_adapters(self) -> list[str]:
        """Serve again the adapters that earlier jobs packed under the work directory (a restart
        keeps them); one that no longer fits this export is skipped. Returns a line for each."""
        suffix = target(self.rt.manifest["target"]).blob_suffix
        lines = []
        for blob in sorted((self.work_dir / "packed").glob(f"*{suffix}")):
            name = blob.name[: -len(suffix)]
            if not is_adapter_id(name) or name in self.rt.adapters or not PACKED.matches(blob):
                continue
            try:
                self.rt.register_adapter(name, blob)
                lines.append(f"serving {name} again (trained by an earlier job: {blob})")
            except OdloraError as e:
                lines.append(f"not serving {blob}: {e}")
        return lines

    def routes(self) -> list[Route]:
        """The page's routes, for the server (`server.build_app`)."""
        return [Route("/", self.page, methods=["GET"]), Route("/app", self.page, methods=["GET"]),
                Route("/app/{name}", self.page, methods=["GET"]),
                Route("/odlora/state", self.get_state, methods=["GET"]),
                Route("/odlora/jobs", self.post_job, methods=["POST"]),
                Route("/odlora/jobs/{job_id}", self.get_job, methods=["GET"]),
                Route("/odlora/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"]),
                Route("/odlora/adapters/{adapter_id}", self.delete_adapter, methods=["DELETE"])]

    async def page(self, request: Request) -> Response:
        page = static_file(request.url.path.rstrip("/"))
        if page is None:
            raise APIError(404, f"no page file {request.url.path}", code="not_found")
        content, media_type = page
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    async def get_state(self, request: Request) -> Response:
        return FiniteJSONResponse(self.state())

    async def get_job(self, request: Request) -> Response:
        return FiniteJSONResponse(self.job(request.path_params["job_id"]).to_dict())

    async def cancel_job(self, request: Request) -> Response:
        job = self.job(request.path_params["job_id"])
        job.cancel_asked = job.state not in FINISHED
        return FiniteJSONResponse(job.to_dict(), status_code=202)

    async def delete_adapter(self, request: Request) -> Response:
        return FiniteJSONResponse(await run_in_threadpool(self.delete, request.path_params["adapter_id"]))

    def delete(self, adapter_id: str) -> dict:
        """Stop serving `adapter_id`; delete its files when a job of this page made them."""
        with self._lock:
            if self.current is not None and self.current.state not in FINISHED and self.current.spec.name == adapter_id:
                raise APIError(409, f"job {self.current.id} is still making {adapter_id!r}: cancel it first",
                               code="job_running")
            if adapter_id not in self.rt.adapters:
                raise APIError(404, f"no adapter {adapter_id!r} is served", code="not_found")
            blob = self.rt.adapters[adapter_id].path
            self.rt.unregister_adapter(adapter_id)
            self.scores.pop(adapter_id, None)
            ours = [p for p in self.job_outputs(adapter_id) if os.path.lexists(p)]
            if blob.resolve() not in {p.resolve() for p in ours}:
                return {"id": adapter_id, "removed": []}  # given to `serve`: the user's file stays
            for path in ours:
                remove_adapter(path)
            return {"id": adapter_id, "removed": [str(p) for p in ours]}

    async def post_job(self, request: Request) -> Response:
        check_json(request)
        spec = read_job(parse_body(JobRequest, await read_body(request)), self.rt)
        job = await run_in_threadpool(self.start, spec)  # it may save an upload: off the event loop
        return FiniteJSONResponse(job.to_dict(), status_code=202)

    def state(self) -> dict:
        manifest = self.rt.manifest
        export = {"target": manifest["target"], "quant": manifest.get("quant"), "base": manifest.get("base"),
                  "backend": self.rt.backend.name, "max_rank": manifest["slots"]["max_rank"],
                  "max_seq_len": self.rt.max_seq_len}
        adapters = dict(self.rt.adapters)
        return {"export": export, "adapters": [self.adapter_facts(adapters[name]) for name in sorted(adapters)],
                "samples": list(SAMPLE_TASKS), "job": self.current.to_dict() if self.current else None}

    def adapter_facts(self, entry) -> dict:
        """What the page shows of a served adapter: from its packed blob's sidecar, plus exact match."""
        metrics = entry.info.get("metrics") or {}
        return {"id": entry.id, "rank": entry.info.get("rank"), "modules": entry.info.get("modules"),
                "size": entry.info.get("size"), "val_loss_before": metrics.get("val_loss_before"),
                "val_loss": metrics.get("val_loss"), "steps": metrics.get("steps"),
                "exact_match": self.scores.get(entry.id)}

    def job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise APIError(404, f"no job {job_id!r}", code="not_found")
        return self.jobs[job_id]

    def start(self, spec: JobSpec) -> Job:
        """Start the job in a thread; a 409 while another runs or when the name is taken."""
        with self._lock:
            if self.current is not None and self.current.state not in FINISHED:
                raise APIError(409, f"job {self.current.id} ({self.current.spec.name}) is still running: one job at "
                                    f"a time", code="job_running")
            if spec.name in self.rt.adapters:
                raise APIError(409, f"an adapter named {spec.name!r} is already served: choose another name",
                               param="name", code="name_taken")
            if any(os.path.lexists(p) for p in self.job_outputs(spec.name)):
                raise APIError(409, f"{self.work_dir} already holds an adapter named {spec.name!r} (from an earlier "
                                    f"run): choose another name", param="name", code="name_taken")
            job = Job(uuid.uuid4().hex[:12], spec)
            if spec.upload is not None:
                spec.data = self.save_upload(job, *spec.upload)
            self.jobs[job.id] = self.current = job
        threading.Thread(target=self.run, args=(job,), name=f"odlora-job-{job.id}", daemon=True).start()
        return job

    def save_upload(self, job: Job, suffix: str, text: str) -> Path:
        path = self.work_dir / "uploads" / f"{job.spec.name}-{job.id}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def job_outputs(self, name: str) -> tuple[Path, Path]:
        """(adapter directory, packed blob) that a job named `name` writes under the work directory;
        a job never replaces them (personalize and pack refuse an existing output without force)."""
        suffix = target(self.rt.manifest["target"]).blob_suffix
        return self.work_dir / "adapters" / name, self.work_dir / "packed" / f"{name}{suffix}"

    def run(self, job: Job) -> None:
        """Train, pack, register, score: the job's thread. A failure ends the job, never the server."""
        spec = job.spec
        try:
            adapter_dir, blob = self.job_outputs(spec.name)
            personalize(self.personalize_config(spec), spec.data, adapter_dir, say=job.say, on_record=job.record)
            job.move_to("packing")
            pack(adapter_dir, self.rt.export_dir, blob)
            self.rt.register_adapter(spec.name, blob)
            if spec.task and spec.eval_examples:
                job.move_to("scoring")
                self.scores[spec.name] = self.score(spec.task, spec.name, spec.eval_examples)
            job.move_to("done", adapter=self.adapter_facts(self.rt.adapters[spec.name]))
        except JobCancelled:
            job.move_to("cancelled")
        except OdloraError as e:
            job.move_to("failed", error=str(e))
        except Exception as e:  # a bug: say so on the page and in the server's log
            traceback.print_exc()
            job.move_to("failed", error=f"internal error: {type(e).__name__}: {e}")

    def personalize_config(self, spec: JobSpec) -> PersonalizeConfig:
        """`odlora personalize`'s defaults, on the export's base, with LoRA on the export's slotted linears."""
        lora = LoraConfig(rank=spec.rank, targets=tuple(self.rt.manifest["slots"]["targets"]))
        # About ten validations for the page's chart, never more often than every 5 steps: each one
        # scores the whole validation split, which in a short job would take longer than the training.
        training = TrainConfig(steps=spec.steps, eval_every=max(5, spec.steps // 10), save_every=0)
        return PersonalizeConfig(base=self.rt.manifest["base"], lora=lora, training=training)

    def score(self, task: str, adapter: str, n: int) -> dict:
        """Exact match on the task's first `n` test examples, base and adapter (greedy, on this export)."""
        examples = load_examples(task, "test")[:n]
        references = [ex["messages"][-1]["content"] for ex in examples]
        return {"task": task, "examples": len(examples),
                "base": exact_match(task_answers(self.rt, examples, None), references),
                "adapter": exact_match(task_answers(self.rt, examples, adapter), references)}
