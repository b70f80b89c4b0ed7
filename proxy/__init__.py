"""cloudbeds-proxy: a sidecar that attaches a shared, refreshed Cloudbeds credential."""

__version__ = "0.1.0"
