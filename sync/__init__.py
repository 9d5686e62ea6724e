"""Offline-first sync: envelopes, keys, the SQLite outbox, MQTT transport and the coordinator."""
