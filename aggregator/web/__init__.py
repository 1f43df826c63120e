"""The web layer: the ASGI app, its routes (retrieval, MCP, ops pages) and the HTTP protocol."""
