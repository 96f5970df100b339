"""Code both sides of the fleet share: topic names (`shared.topics`), the wire protocol
(`shared.protocol`), MQTT plumbing (`shared.mqtt`) and the config file's merge with flags and
environment (`shared.config_file`).

The bottom of the import graph: only the standard library, numpy, msgpack and paho-mqtt.
"""
