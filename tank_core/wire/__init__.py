"""The wire layer: RFC 6455 frames (ours built once, the common ones parsed without wsproto), the
upgrade handshake, close codes, the Tank text protocol's codec, one socket's protocol state."""
