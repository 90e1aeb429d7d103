"""Worked examples of whole models with LSTMs inside: run them with `python -m examples.NAME`."""
