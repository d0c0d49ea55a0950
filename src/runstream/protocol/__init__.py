"""Wire protocols without I/O: the SSE codec and resume positions."""
