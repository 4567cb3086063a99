"""Framework-free math of fedge's algorithms (no Flower imports here).

Each algorithm ``foo`` declares itself in ``algorithms/foo.py`` (see :mod:`algorithms.base`);
nothing is imported here, so a run loads only the algorithm it uses.
"""
