"""Real evaluation data, read offline from packages installed by ``make``."""
