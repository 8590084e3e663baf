"""Benchmarks (``python -m bench.<name>``): each prints its figures next to a same-run baseline
and ends with one JSON line. ``failover`` and ``scheduler`` start real components (root for
``failover``: it builds a dev cluster); ``packing`` runs the pure scheduler on published instances."""
