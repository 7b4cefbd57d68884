"""The lab: the paper's experiments as grids of tiny recipes over seeds (``grid``: the resumable runner; ``compare``:
figures, tables and paired comparisons over seeds; ``stats``: the t-interval, the rules that decide a comparison and
their power)."""
