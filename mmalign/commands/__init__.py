"""One module per ``mmalign`` subcommand; each exposes ``add_parser(subparsers)`` and sets ``func=run``.

Add a command by writing a module here and naming it in :data:`COMMANDS` (imported when the CLI starts, so keep
heavy imports inside ``run``). Modules whose names start with ``_`` are argument helpers that commands share.
"""

COMMANDS = [
    "score",
    "list",
    "convert",
    "demo",
    "train",
    "bench",
    "label",
    "generate",
    "annotate",
    "serve",
    "accelerate_config",
]
