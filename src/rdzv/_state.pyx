"""The compiled rendezvous core (being written)."""
