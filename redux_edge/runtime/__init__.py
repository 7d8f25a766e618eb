"""The runner shipped in every bundle: it needs the standard library, numpy and the backend's runtime only.

Its modules import each other relatively, never redux-edge, so the same code runs here as
``redux_edge.runtime`` and on a device as the package inside ``runner/run.pyz`` (a zipapp that the
compile writes; ``runner/run.py`` starts it): ``session`` (open a bundle, check inputs, benchmark),
``backend_<name>`` (one executor and per-layer profiler per backend, found by the manifest's backend
name), ``packed`` (N:M weights stored packed), ``adapter_pack`` (the pack format), ``tolerance`` (the
one comparison rule of compile and health check), ``tegrastats`` and ``main`` (the command line).
"""
