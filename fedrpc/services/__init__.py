"""Domain rules that handlers and background tasks share.

No aiohttp and no psycopg here: services talk to Postgres through
``fedrpc.db.Database`` and its named queries, to S3 through
``fedrpc.storage.Storage``, and do their math through the pure kernels in
``fedrpc.fl``. Who may do what is decided in :mod:`fedrpc.services.policy`.
"""
