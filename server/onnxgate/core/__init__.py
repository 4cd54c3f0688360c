"""The serving core: models, scheduling, statistics and metrics. Knows nothing of gRPC or HTTP."""
