"""The benchmark apps: one module per library, each exposing ``build(url, mode) -> ASGIApp``.

``benchmarks.variants`` lists which function serves which variant. The WSGI side
(Flask-SQLAlchemy, Flask-SQLAlchemy-Lite, bare Flask, sessionscope's Flask adapter under
gunicorn) will add ``wsgi_*.py`` modules exposing ``build(url, mode) -> WSGIApp`` here and
variants with ``server="gunicorn"``.
"""
