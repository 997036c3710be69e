"""The code that makes the project's numbers: speed measurements (and, in time, the sweep runner and table maker)."""
