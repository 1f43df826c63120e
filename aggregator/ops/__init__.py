"""What operators see: per-source health, Prometheus metrics, the status page and the log format."""
