# The rendezvous core; see _state.pxd.
