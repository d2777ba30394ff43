"""The byte-level server: ``TankServer`` joins the engine, the wire layer and the HTTP API."""

from .facade import TankServer

__all__ = ["TankServer"]
