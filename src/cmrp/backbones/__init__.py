"""Backbone adapters behind one protocol (`cmrp.backbones.protocol.Backbone`).

Adapters register by name in `cmrp.registry.BACKBONES`; importing this package does not import them.
"""

__all__: list[str] = []
