"""Where a run executes: the simulation engine (``engine``) on Ray (``cluster``), or Flower's
Deployment Engine on this machine (``federation``: SuperLink, SuperNodes, TLS)."""
