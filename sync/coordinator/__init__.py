"""The cloud coordinator: ingest, de-duplicate, store, receipts, fleet registry, HTTP API."""
