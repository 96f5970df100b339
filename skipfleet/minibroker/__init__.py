"""An embedded MQTT 3.1.1 / 5 broker in pure Python (asyncio, standard library only), for
`skipfleet simulate` on a machine without mosquitto. See README.md in this package for what it
supports and what it does not."""

from skipfleet.minibroker.config import DEFAULT_MAX_PACKET_SIZE, BrokerConfig, BrokerStats
from skipfleet.minibroker.server import MiniBroker, serve

__all__ = ["DEFAULT_MAX_PACKET_SIZE", "BrokerConfig", "BrokerStats", "MiniBroker", "serve"]
