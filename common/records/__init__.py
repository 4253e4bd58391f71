"""Documents: the result JSON (built, checked by its typed schema, written atomically), anatomical passports
(typed in memory, JSON on disk), resume keys and the metrics they hold.

May import: core, imaging.
"""
