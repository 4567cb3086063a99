"""The top of fedge: the command line, the engines, reports and deployment.

Nothing below imports this package: ``scenarios/`` (schema, results format) and ``algorithms/`` (math)
are the ground floor, ``clients/``, ``edge/`` and ``server/`` (the Flower apps) stand on them, and
this package drives the apps.
"""
