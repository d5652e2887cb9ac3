"""Edit-quality evaluation: the shapes world's exact score (``shapes``)."""
