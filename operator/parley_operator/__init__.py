"""Parley operator: deploys and autoscales Parley chat platforms (ChatPlatform resources)."""
