"""Reports: records (JSONL) -> pandas tables -> leaderboards."""
