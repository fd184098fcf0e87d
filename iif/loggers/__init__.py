"""Experiment loggers (config group ``logger``). Metrics always also go to the run directory."""
