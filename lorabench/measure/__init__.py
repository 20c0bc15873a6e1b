"""Measurements that go into every record: memory, provenance (DESIGN "Measurement protocol")."""
