"""The run directory: its names and lock, archives (read, streamed write), resume rules, the save
protocol."""
