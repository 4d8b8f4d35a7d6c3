"""``mmalign annotate``: the preference-collection web app and its database.

    mmalign annotate init --db annotate.db                 # create / migrate; prints the first admin's token
    mmalign annotate users add alice [--admin]             # prints alice's token (shown once)
    mmalign annotate users list | revoke NAME | token NAME
    mmalign annotate add-task NAME --kind pairwise --from DIR [--judgements 3] [--dimensions a,b] [--gold F]
    mmalign annotate add-task NAME --arena GEN_A=DIR GEN_B=DIR ... [--kind pairwise|kwise] [--k K]
    mmalign annotate add-task NAME --arena --from DIR      # DIR/<generator>/<id>.<ext> (+ DIR/prompts.jsonl)
    mmalign annotate serve [--host 127.0.0.1 --port 8000]
    mmalign annotate route --task NAME --reward R --budget N   # the reward labels all but the N least sure items
    mmalign annotate stats [--task NAME]                   # progress, gold accuracy, agreement (JSON)
    mmalign annotate export --task NAME --format pairs|d3po|votes --out PATH [--source human|ai|all]

``--db`` is a SQLite file path or a SQLAlchemy URL (``postgresql+psycopg://user@host/db``); default
``$MMALIGN_ANNOTATE_DB`` or ``annotate.db``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        default=os.environ.get("MMALIGN_ANNOTATE_DB", "annotate.db"),
        help="SQLite file or database URL (default $MMALIGN_ANNOTATE_DB or annotate.db)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "annotate",
        help="collect human preferences in a web app (tasks, annotators, exports)",
        description="Preference collection: `init`, `users`, `add-task`, `serve`, `stats`, `export`.",
    )
    acts = p.add_subparsers(dest="action", required=True)

    q = acts.add_parser("init", help="create or migrate the database; creates the first admin")
    _db_arg(q)
    q.add_argument("--admin", default="admin", help="name of the first admin (created when no annotator exists)")

    q = acts.add_parser("migrate", help="apply pending schema migrations")
    _db_arg(q)

    q = acts.add_parser("users", help="annotator accounts")
    _db_arg(q)
    q.add_argument("op", choices=["add", "list", "revoke", "restore", "token"])
    q.add_argument("name", nargs="?")
    q.add_argument("--admin", action="store_true", help="with add: an admin (sees the progress page)")

    q = acts.add_parser("add-task", help="a task from a media folder, a manifest or `mmalign label` output")
    _db_arg(q)
    q.add_argument("name")
    q.add_argument("--kind", choices=["pairwise", "kwise", "rating"], help="required; arena: default pairwise")
    q.add_argument("--from", dest="source", metavar="DIR", help="folder or manifest.jsonl (required unless --arena)")
    q.add_argument(
        "--arena",
        nargs="*",
        metavar="GEN=DIR",
        help="an arena task: anonymous battles between generators, one output folder (or `mmalign label` "
        "folder) per generator; without GEN=DIR, the model folders of --from",
    )
    q.add_argument("--k", type=int, help="arena K-wise: generators per vote (default: all)")
    q.add_argument("--prompts", help='arena: JSONL of {"id", "prompt"} for the outputs\' ids')
    q.add_argument("--judgements", type=int, default=3, help="independent judgements per item")
    q.add_argument("--dimensions", default="", help="rating dimensions, comma separated (default: overall)")
    q.add_argument("--instructions", default="")
    q.add_argument("--gold", help='JSONL of {"item": position, "answer": {...}} gold questions')
    q.add_argument("--gold-every", type=int, default=5, help="one gold question every N answers")
    q.add_argument("--lease", type=float, default=1800.0, help="seconds an unanswered assignment is held")

    q = acts.add_parser("serve", help="run the web app (loopback only unless --allow-remote)")
    _db_arg(q)
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8000)
    q.add_argument("--allow-remote", action="store_true", help="listen on a non-loopback address")
    q.add_argument("--log-level", default="info")

    q = acts.add_parser("route", help="hybrid labelling: a reward labels the items it is sure of, people the rest")
    _db_arg(q)
    q.add_argument("--task", required=True)
    q.add_argument("--reward", required=True, help="reward name (as `mmalign list` shows)")
    q.add_argument("--reward-weights", help="reward checkpoint path")
    q.add_argument("--budget", type=int, required=True, help="items left to people (the least confident)")
    q.add_argument("--device", default="cpu")

    q = acts.add_parser("stats", help="progress, gold accuracy and agreement as JSON")
    _db_arg(q)
    q.add_argument("--task", help="one task (default: all)")

    q = acts.add_parser("export", help="pairs JSONL, D3PO scores or arena votes")
    _db_arg(q)
    q.add_argument("--task", required=True)
    q.add_argument("--format", required=True, choices=["pairs", "d3po", "votes"])
    q.add_argument("--out", required=True, help="file (pairs, votes) or folder (d3po)")
    q.add_argument("--source", default=None, choices=["human", "ai", "all"], help="default: all (d3po: human)")
    q.add_argument("--dimension", help="rating tasks: use this dimension instead of the mean")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..annotate.db import AnnotateError, Database, init_database, migrate

    def out(value: object) -> None:
        print(json.dumps(value, indent=2))

    if args.action == "init":
        from ..annotate.people import add_user, list_users

        db, applied = init_database(args.db)
        print(
            f"mmalign annotate: database {db.url} ready (migrations applied now: {applied or 'none'})", file=sys.stderr
        )
        if not list_users(db):
            token = add_user(db, args.admin, admin=True)
            print(f"admin {args.admin!r} token (shown once): {token}")
        return 0
    if args.action == "migrate":
        db = Database(args.db, check=False)
        print(f"applied: {migrate(db.engine) or 'none'}")
        return 0
    db = Database(args.db)
    if args.action == "users":
        from ..annotate import people

        if args.op == "list":
            out(people.list_users(db))
            return 0
        if not args.name:
            raise AnnotateError(f"users {args.op} needs a NAME")
        if args.op == "add":
            print(people.add_user(db, args.name, admin=args.admin))
        elif args.op == "token":
            print(people.rotate_token(db, args.name))
        else:
            people.set_active(db, args.name, args.op == "restore")
        return 0
    if args.action == "add-task":
        from ..annotate.tasks import add_arena_task, add_task, parse_generators

        if args.arena is not None:
            if args.kind == "rating" or args.dimensions or args.gold:
                raise AnnotateError("an arena task is pairwise or kwise, without dimensions or gold questions")
            if not args.arena and not args.source:
                raise AnnotateError("--arena needs GEN=DIR arguments, or --from DIR with one folder per generator")
            out(
                add_arena_task(
                    db,
                    args.name,
                    parse_generators(args.arena),
                    source=args.source,
                    kind=args.kind or "pairwise",
                    k=args.k,
                    prompts=args.prompts,
                    judgements=args.judgements,
                    instructions=args.instructions,
                    lease_seconds=args.lease,
                )
            )
            return 0
        if args.kind is None or args.source is None or args.k is not None or args.prompts:
            raise AnnotateError("add-task needs --kind and --from (--k and --prompts are for --arena tasks)")
        out(
            add_task(
                db,
                args.name,
                args.kind,
                args.source,
                judgements=args.judgements,
                dimensions=args.dimensions.split(",") if args.dimensions else (),
                instructions=args.instructions,
                gold=args.gold,
                gold_every=args.gold_every,
                lease_seconds=args.lease,
            )
        )
        return 0
    if args.action == "serve":
        from ..annotate.app import serve

        serve(args.db, args.host, args.port, allow_remote=args.allow_remote, log_level=args.log_level)
        return 0
    if args.action == "route":
        from ..annotate.routing import reward_scorer, route

        scorer = reward_scorer(args.reward, args.reward_weights, args.device)
        out(route(db, args.task, scorer, args.budget, args.reward))
        return 0
    if args.action == "stats":
        from sqlalchemy import select

        from ..annotate.db import Task
        from ..annotate.stats import all_stats, task_stats

        if args.task:
            with db.session() as s:
                task = s.scalar(select(Task).where(Task.name == args.task))
                if task is None:
                    raise AnnotateError(f"no task named {args.task!r}")
                task_id = task.id
            out(task_stats(db, task_id))
        else:
            out(all_stats(db))
        return 0
    if args.action == "export":
        from ..annotate.export import export

        source = args.source or ("human" if args.format == "d3po" else "all")
        result = export(db, args.task, args.format, args.out, source, args.dimension)
        print(json.dumps({"out": args.out, "format": args.format, "source": source, "written": result}))
        return 0
    raise AnnotateError(f"unknown action {args.action!r}")
