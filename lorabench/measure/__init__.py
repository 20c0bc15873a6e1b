"""Measurements that go into every record: memory, provenance (docs/architecture.md, "Measurement protocol")."""
