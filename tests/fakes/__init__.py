"""Strict fakes of the push platforms: TLS on loopback, checking what the real services check."""
