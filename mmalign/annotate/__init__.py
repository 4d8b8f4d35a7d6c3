"""Preference collection: a web app on a real database for human judgements of generated media.

``mmalign annotate init | users | add-task | serve | stats | export`` (see :mod:`mmalign.commands.annotate`).
Modules: :mod:`.db` (models, engine, migrations), :mod:`.people` (accounts and tokens), :mod:`.tasks` (tasks from
media folders, manifests, ``mmalign label`` output), :mod:`.answers` (validation, gold checks), :mod:`.assign`
(hand-out and recording), :mod:`.stats` (progress, gold accuracy, agreement), :mod:`.export` (pairs, D3PO
scores, arena votes), :mod:`.app` (FastAPI pages and API). Light at import: the web stack loads in ``app``.
"""
