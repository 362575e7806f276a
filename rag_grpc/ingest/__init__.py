"""Asynchronous ingestion: a durable job queue in SQLite and its worker."""
