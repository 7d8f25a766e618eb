"""EM side-channel analysis of a model's first layer: the C kernel a microcontroller runs (``kernel``),
simulated traces of its MAC loop (``simulate``), weight recovery by correlation (``attack``), fixed-vs-random
t-tests (``tvla``) and readers for captured traces (``traces``)."""
