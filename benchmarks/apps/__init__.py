"""The benchmark apps: one module per library, each exposing ``build(url, mode)``.

The ASGI modules (``baseline``, ``sessionscope_app``, ``peer_*``) return a Starlette app
served by uvicorn and share ``common``; the WSGI modules (``wsgi_baseline``,
``wsgi_sessionscope``, ``wsgi_peer_*``) return a Flask app served by gunicorn and share
``wsgi_common``. Both build on ``shared`` (the table, the JSON shapes, the SQLite settings).
``benchmarks.variants`` lists which function serves which variant.
"""
