"""The preference-optimisation methods, one module each (``spo``, ``dpo``): how a method turns its next batch of work
into a loss. A new method is a module here with the same ``setup``/``work`` interface, chosen in ``spo_fast.train``."""
