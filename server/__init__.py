"""voxlane speech server: Orpheus layout, speech LM engine, SNAC codec, WebSocket server.

Needs the ``server`` extra (torch, transformers, snac, ...). Submodules import
torch lazily where they can, so :mod:`voxlane.server.orpheus` stays pure Python.
"""
