"""The recipe YAMLs (``tiny/``, ``paper/``), installed as the data package ``pgzoo.recipe_files`` so that
``pgzoo train tiny/minirl`` and ``pgzoo recipe list`` work outside a checkout. Nothing to import here."""
