"""FlashLive streaming: aiohttp + aiortc service, capture sources and sinks."""
