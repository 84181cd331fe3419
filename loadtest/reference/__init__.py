"""The reference servers `loadtest/bench.py` compares Parley against: the Channels tutorial chat,
unchanged (`consumers.py`, /ws/chat/<room>/), and the O(1) pub/sub hub (`hub.py`, /ws/hub/<room>/)."""
