"""FlashLive engine: the models and their inference."""
