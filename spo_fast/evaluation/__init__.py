"""Held-out evaluation of a trained model against its base (``heldout``) and the labelled image grids (``grids``)."""
