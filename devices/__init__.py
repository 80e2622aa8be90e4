"""Devices: the registry model and the device-side reference clients."""
