"""The dgdm edge agent: config, runtime, HTTP endpoint, telemetry, TPU health and the CLI."""

__version__ = "0.1.0"
