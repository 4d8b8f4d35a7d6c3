"""The web app (FastAPI): pages rendered on the server with Jinja2 (autoescaped, plain HTML forms that work
without JavaScript; ``static/app.js`` only adds keyboard shortcuts), and a JSON API for scripts and load tests.

Security: every write needs an annotator (a token: the ``Authorization: Bearer`` header, or the session cookie
set by the login form); cookie-authenticated writes also need the CSRF token (double submit: the
``mmalign_csrf`` cookie equals the form's ``csrf`` field or the ``X-CSRF-Token`` header) and a same-origin
``Origin`` when the browser sends one. Media come only from a task's folder and only the files its items
name, by numbers (task, item, option, view), never by a path from the request. Every answer carries a strict
Content-Security-Policy (no inline script, nothing from elsewhere), ``X-Content-Type-Options``,
``X-Frame-Options``, ``Referrer-Policy: same-origin`` (with ``no-referrer`` browsers send ``Origin: null``
on same-site form posts), and ``Cache-Control: no-store`` on pages and API answers.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from . import arena, assign
from .db import AnnotateError, Annotator, Database, Item, Judgement, Task
from .people import authenticate
from .stats import all_stats, fmt, task_stats
from .tasks import MIME, option_root

HERE = Path(__file__).parent
SESSION_COOKIE = "mmalign_session"
CSRF_COOKIE = "mmalign_csrf"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
MAX_BODY = 64 * 1024


class SecurityHeaders:
    """ASGI middleware: the headers above on every response, ``no-store`` on everything but static files and
    media, and request bodies over 64 KiB refused (413) before they are read."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            response = JSONResponse({"error": f"request body over {MAX_BODY} bytes"}, status_code=413)
            await response(scope, receive, self._wrap(send, scope))
            return
        await self.app(scope, receive, self._wrap(send, scope))

    @staticmethod
    def _wrap(send: Any, scope: dict) -> Any:
        path = scope.get("path", "")
        cache = path.startswith("/static/") or path.startswith("/media/")

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                existing = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in existing]
                if not cache:
                    extra.append((b"cache-control", b"no-store"))
                else:
                    extra.append((b"cache-control", b"private, max-age=3600"))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        return wrapped


class BlindFileResponse(FileResponse):
    """A media file without ``Last-Modified`` and ``ETag`` (blind judging: a file's modification time could tell
    one generator's outputs from another's); ranges still work, an ``If-Range`` never matches (full file)."""

    def set_stat_headers(self, stat_result: os.stat_result) -> None:
        self.headers.setdefault("content-length", str(stat_result.st_size))

    def _should_use_range(self, http_if_range: str) -> bool:
        return False


class JudgementIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    assignment: int = Field(ge=1)
    answer: dict[str, Any]
    seconds: float | None = Field(default=None, ge=0, le=86400)
    next: bool = False


def _error_text(error: RequestValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {problem.get('msg')}")
    return "; ".join(parts)


def create_app(db: Database) -> FastAPI:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True)
    env.globals["fmt"] = fmt
    app = FastAPI(title="mmalign annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = db
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    media_cache: dict[tuple[int, int, int, int], tuple[str, str]] = {}
    media_lock = threading.Lock()

    def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        csrf = request.cookies.get(CSRF_COOKIE) or ""
        fresh = not csrf or len(csrf) != 43
        if fresh:
            csrf = secrets.token_urlsafe(32)
        html = env.get_template(template).render(csrf=csrf, user=getattr(request.state, "user", None), **context)
        response = HTMLResponse(html, status_code=status)
        if fresh:
            response.set_cookie(
                CSRF_COOKIE, csrf, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
            )
        return response

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    @app.exception_handler(AnnotateError)
    async def annotate_error(request: Request, error: AnnotateError) -> Response:
        if wants_json(request):
            return JSONResponse({"error": str(error)}, status_code=error.status)
        return page(request, "error.html", status=error.status, message=str(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        message = f"invalid request: {_error_text(error)}"
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=422)
        return page(request, "error.html", status=422, message=message)

    # ------------------------------------------------------------ authentication and CSRF

    def user_of(request: Request) -> tuple[Annotator | None, bool]:
        """The annotator and whether it came from the cookie (which then needs the CSRF check on writes)."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return authenticate(db, header[7:].strip()), False
        token = request.cookies.get(SESSION_COOKIE)
        return (authenticate(db, token), True) if token else (None, False)

    def check_csrf(request: Request, form_value: str | None) -> None:
        origin = request.headers.get("origin")
        # "null" (an opaque origin: browsers send it under some referrer policies) tells nothing; the token decides
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise AnnotateError("cross-origin request refused", 403)
        cookie = request.cookies.get(CSRF_COOKIE) or ""
        given = form_value or request.headers.get("x-csrf-token") or ""
        if not cookie or not hmac.compare_digest(cookie.encode(), given.encode()):
            raise AnnotateError("missing or wrong CSRF token: reload the page and try again", 403)

    def require(
        request: Request, *, write: bool = False, admin: bool = False, form_csrf: str | None = None
    ) -> Annotator:
        user, by_cookie = user_of(request)
        if user is None:
            raise AnnotateError("log in first: an annotator token is needed", 401)
        if write and by_cookie:
            check_csrf(request, form_csrf)
        if admin and not user.is_admin:
            raise AnnotateError("admins only", 403)
        request.state.user = user
        return user

    def task_or_404(task_id: int) -> Task:
        with db.read() as s:
            task = s.get(Task, task_id)
            if task is None:
                raise AnnotateError(f"no task {task_id}", 404)
            return task

    # ------------------------------------------------------------ pages

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        return page(request, "login.html")

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        check_csrf(request, str(form.get("csrf") or ""))
        token = str(form.get("token") or "").strip()
        user = authenticate(db, token)
        if user is None:
            return page(request, "login.html", status=401, message="unknown or revoked token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
            max_age=30 * 24 * 3600,
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        form = await request.form()
        check_csrf(request, str(form.get("csrf") or ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def my_tasks(user: Annotator) -> list[dict]:
        with db.read() as s:
            tasks = s.scalars(select(Task).order_by(Task.id)).all()
            mine = dict(
                s.execute(
                    select(Judgement.task_id, func.count(Judgement.id))
                    .where(Judgement.annotator_id == user.id)
                    .group_by(Judgement.task_id)
                ).all()
            )
            counts = dict(s.execute(select(Item.task_id, func.count(Item.id)).group_by(Item.task_id)).all())
            return [
                dict(
                    id=t.id,
                    name=t.name,
                    kind=t.kind,
                    media=t.media,
                    mine=mine.get(t.id, 0),
                    items=counts.get(t.id, 0),
                    arena=t.mode == "arena",
                )
                for t in tasks
            ]

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        user, _ = user_of(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        request.state.user = user
        return page(request, "index.html", tasks=my_tasks(user))

    @app.get("/tasks/{task_id}", response_class=HTMLResponse)
    def task_page(request: Request, task_id: int) -> Response:
        user, _ = user_of(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        request.state.user = user
        task_or_404(task_id)
        current = assign.next_assignment(db, task_id, user.id)
        if current is None:
            return page(request, "done.html", task=task_or_404(task_id))
        if current["arena"]:
            return page(request, "arena.html", a=current)
        return page(request, "task.html", a=current, message=request.query_params.get("saved"))

    @app.post("/tasks/{task_id}/submit")
    async def submit(request: Request, task_id: int) -> Response:
        form = await request.form()
        user = require(request, write=True, form_csrf=str(form.get("csrf") or ""))
        task = task_or_404(task_id)
        assignment_id = assign_int(form.get("assignment"))
        if task.mode == "arena":  # the form names display positions; the assignment's recorded order maps them
            of_task, order = assign.display_order(db, assignment_id, user.id)
            if of_task != task_id:
                raise AnnotateError(f"no assignment {assignment_id} of yours in task {task_id}", 404)
            answer = assign.from_display(task.kind, answer_from_form(task, form, len(order)), order)
            assign.record(db, assignment_id, user.id, answer)
            return RedirectResponse(f"/tasks/{task_id}/reveal/{assignment_id}", status_code=303)
        answer = answer_from_form(task, form, assign.options_count(db, assignment_id, user.id))
        assign.record(db, assignment_id, user.id, answer)
        return RedirectResponse(f"/tasks/{task_id}?saved=1", status_code=303)

    @app.get("/tasks/{task_id}/reveal/{assignment_id}", response_class=HTMLResponse)
    def reveal_page(request: Request, task_id: int, assignment_id: int) -> Response:
        user = require(request)
        shown = assign.reveal(db, assignment_id, user.id)
        if shown["task"] != task_id:
            raise AnnotateError("not found", 404)
        return page(request, "reveal.html", r=shown)

    def leaderboard_of(request: Request, task_id: int, user: Annotator) -> dict:
        task = task_or_404(task_id)
        if task.mode != "arena" and not user.is_admin:  # a blind task's generators stay hidden from annotators
            raise AnnotateError(
                "leaderboards of arena tasks only (admins: any task whose options name generators)", 403
            )
        resamples = request.query_params.get("bootstrap", str(arena.DEFAULTS["n_resamples"]))
        if not resamples.isdigit():
            raise AnnotateError(f"bootstrap must be a whole number 0..{arena.MAX_RESAMPLES}, got {resamples!r}")
        return arena.leaderboard(db, task_id, n_resamples=int(resamples))

    @app.get("/tasks/{task_id}/leaderboard", response_class=HTMLResponse)
    def leaderboard_page(request: Request, task_id: int) -> Response:
        user = require(request)
        result = leaderboard_of(request, task_id, user)
        return page(request, "leaderboard.html", lb=result, t=arena.table(result))

    @app.get("/api/tasks/{task_id}/leaderboard")
    def api_leaderboard(request: Request, task_id: int) -> Response:
        from ..bench.runner import json_safe

        user = require(request)
        return JSONResponse(json_safe(leaderboard_of(request, task_id, user)))

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request) -> Response:
        require(request, admin=True)
        return page(request, "admin.html", stats=all_stats(db))

    # ------------------------------------------------------------ media

    def media_file(task_id: int, item_id: int, option: int, view: int) -> tuple[str, str]:
        """(task folder, file relative to it) of one media file, looked up by numbers (cached)."""
        key = (task_id, item_id, option, view)
        with media_lock:
            if key in media_cache:
                return media_cache[key]
        with db.read() as s:
            task, item = s.get(Task, task_id), s.get(Item, item_id)
            if task is None or item is None or item.task_id != task_id or not 0 <= option < len(item.options):
                raise AnnotateError("not found", 404)
            entry = item.options[option]
            views = entry["views"] if "views" in entry else [entry["path"]]
            if not 0 <= view < len(views):
                raise AnnotateError("not found", 404)
            found = (os.path.realpath(option_root(task, entry)), views[view])
        with media_lock:
            if len(media_cache) < 100_000:
                media_cache[key] = found
        return found

    @app.get("/media/{task_id}/{item_id}/{option}/{view}")
    def media(request: Request, task_id: int, item_id: int, option: int, view: int) -> Response:
        """A task's media by numbers only; on every request the file must resolve inside the task's folder (a
        symlink put there later that points out is refused). No file name, time or ETag in the answer."""
        require(request)
        root, rel = media_file(task_id, item_id, option, view)
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([full, root]) != root or not os.path.isfile(full):
            raise AnnotateError("not found", 404)
        mime = MIME.get(Path(full).suffix.lower(), "application/octet-stream")
        return BlindFileResponse(full, media_type=mime)

    # ------------------------------------------------------------ JSON API

    @app.get("/api/health")
    def health() -> dict:
        return {"ok": True}

    @app.get("/api/tasks")
    def api_tasks(request: Request) -> list[dict]:
        user = require(request)
        return my_tasks(user)

    @app.post("/api/tasks/{task_id}/next")
    def api_next(request: Request, task_id: int) -> Response:
        user = require(request, write=True)
        task_or_404(task_id)
        current = assign.next_assignment(db, task_id, user.id)
        return JSONResponse({"assignment": current})

    @app.post("/api/judgements")
    def api_judgement(request: Request, body: JudgementIn) -> Response:
        user = require(request, write=True)
        result = assign.record(db, body.assignment, user.id, body.answer, seconds=body.seconds)
        if body.next:
            result["next"] = assign.next_assignment(db, result["task"], user.id)
        return JSONResponse(result, status_code=201 if result["status"] == "recorded" else 200)

    @app.get("/api/tasks/{task_id}/stats")
    def api_stats(request: Request, task_id: int) -> dict:
        require(request, admin=True)
        task_or_404(task_id)
        return task_stats(db, task_id)

    return SecurityHeadersApp(app)


class SecurityHeadersApp(SecurityHeaders):
    """The FastAPI app wrapped in :class:`SecurityHeaders`; ``.fastapi`` is the app itself."""

    def __init__(self, app: FastAPI):
        super().__init__(app)
        self.fastapi = app
        self.state = app.state


def assign_int(value: Any) -> int:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        raise AnnotateError(f"assignment must be a number, got {value!r}") from None
    if number < 1:
        raise AnnotateError(f"assignment must be positive, got {number}")
    return number


def answer_from_form(task: Task, form: Any, k: int) -> dict[str, Any]:
    """The answer of a submitted HTML form (field names as the templates write them)."""
    if task.kind == "pairwise":
        choice = form.get("choice")
        if choice is None:
            raise AnnotateError("choose one of the two, or a tie")
        return {"choice": str(choice)}
    if task.kind == "kwise":
        return {"ranks": [form.get(f"rank_{i}") for i in range(k)]}
    return {"scores": {dim: [form.get(f"score_{d}_{i}") for i in range(k)] for d, dim in enumerate(task.dimensions)}}


def serve(
    db_path: str, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False, log_level: str = "info"
) -> None:
    """Run the app under uvicorn; only on a loopback address unless ``allow_remote``."""
    import ipaddress

    import uvicorn

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise AnnotateError(
            f"refusing to listen on {host}: the app serves on loopback only unless --allow-remote is given "
            "(put it behind a TLS proxy then)"
        )
    db = Database(db_path)
    uvicorn.run(create_app(db), host=host, port=port, log_level=log_level, access_log=False)
