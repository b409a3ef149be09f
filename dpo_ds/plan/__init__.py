"""Will it fit? The memory estimate of a run (estimate.py) and the planner that prints it (planner.py):
they ask the layout and the reference-mode registry, never re-decide."""
