"""egress: what may leave the perimeter, and where it may connect.

- :mod:`egress.destinations`: named destinations from a versioned file, frozen.
- :mod:`egress.addresses`: an IP address's typed deny reasons (the SSRF table).
- :mod:`egress.resolver`: resolve a host, check every address, pick the one to dial.
- :mod:`egress.connector`: an aiohttp session that can dial only that address.

Importable on its own: it never imports :mod:`gateway` (docs/egress.md).
"""
