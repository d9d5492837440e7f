"""Run folders and what runs many of them: the run-folder layout, resuming, sweeps, reports, baseline reproduction."""
