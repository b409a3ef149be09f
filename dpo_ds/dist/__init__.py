"""The process group and what every rank does together: "rank 0 decides", "any rank flagged",
"fail alike", memory across ranks, the watchdog, the launcher."""
