"""The entry points: train (build the run, then the loop), prepare, export, plot."""
