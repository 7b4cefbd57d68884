"""The lab: the paper's experiments as grids of tiny recipes over seeds (``grid``: the resumable runner; ``compare``:
figures, tables and paired comparisons over seeds)."""
