"""The process: the service's life cycle, the gateway built from a config, the config itself, the GC."""
