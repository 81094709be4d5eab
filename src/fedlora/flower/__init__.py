"""fedlora as a Flower app: the same methods, sampling, screening and evaluation as the
simulation, with clients on SuperNodes (``server_app.app``, ``client_app.app``).

See README "Flower deployment" and ``flower_app/pyproject.toml``.
"""
