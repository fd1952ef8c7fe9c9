"""The NOPS event bus: topics, consumer groups, acks, redelivery and dead letters on Redis Streams.

``python -m bus serve`` runs the HTTP service (:mod:`bus.app`) that the
gateway routes ``/bus/`` to; :class:`bus.streams.BusClient` is the same bus
as a Python API for in-process publishers. Independent of the gateway
package; see docs/bus.md.
"""
