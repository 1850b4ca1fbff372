"""Bridges that carry voxlane sessions into other transports (LiveKit, MQTT)."""
