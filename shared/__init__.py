"""Code both sides of the fleet share: topic names (`shared.topics`), the wire protocol
(`shared.protocol`) and MQTT plumbing (`shared.mqtt`).

The bottom of the import graph: only the standard library, numpy, msgpack and paho-mqtt.
"""
