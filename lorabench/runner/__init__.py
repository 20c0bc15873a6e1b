"""Suites -> trials -> one subprocess per trial -> JSONL records (DESIGN "The data flow")."""
