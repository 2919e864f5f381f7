"""Reading corpora (stable ids, quarantine) and writing a run's output (ledger, selected rows, commit)."""
