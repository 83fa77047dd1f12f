"""attnserve's HTTP layer: the LitServe API, its schemas, settings and metrics."""
