"""Suites -> trials -> one subprocess per trial -> JSONL records (docs/architecture.md, "The data flow")."""
