"""The tests' mosquitto is the product's own launcher (skipfleet/brokers.py)."""

from skipfleet.brokers import MosquittoBroker, find_mosquitto, free_port

__all__ = ["MosquittoBroker", "find_mosquitto", "free_port"]
