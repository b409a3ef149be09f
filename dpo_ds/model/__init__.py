"""Model directories, attention, adapters and the log-prob wrapper (logprobs/: each kernel beside its
torch reference). No deepspeed: the engine layer above builds and wraps what is here."""
